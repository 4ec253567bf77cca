"""ChatML formatting and assistant-only loss masks.

    <|im_start|>role\ncontent<|im_end|>\n
"""

from __future__ import annotations

from polyglu.data.tokenizer import IM_END, IM_START


def render_chatml(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Messages [{"role", "content"}] as ChatML text; optionally open an assistant turn."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    if add_generation_prompt:
        text += f"{IM_START}assistant\n"
    return text
