"""The special tokens every tokenizer polyglu trains or ships has: the document separator (EOS),
the ChatML turn markers and padding. Data sources split documents at EOS_TOKEN; chat formatting
wraps turns in IM_START/IM_END."""

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
# in this order after the 256 bytes of the byte tokenizer (ids 256..259) and first in a trained BPE
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END, PAD_TOKEN)
# the label of positions that carry no loss (padding, prompts in fine-tuning): PyTorch's cross-entropy default
IGNORE_INDEX = -100
