"""``loft generate RUN_DIR``: the fine-tuned model completes a prompt, streamed to the terminal.

The prompt is wrapped the way the run's training prompts were (:func:`format_prompt`): the chat
template for chat data, Alpaca's template for Alpaca data, ``Question: ...\\nAnswer:`` for
multiple-choice data, as given for prompt/completion data. Streaming is transformers'
``TextStreamer``; decoding is greedy unless ``--temperature`` is above 0.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable, TextIO

from .errors import LoftUsageError
from .runmodel import RunModel, load_run

__all__ = ["FORMATS", "format_prompt", "generate", "run_generate"]

#: --format values (``auto``: what the run trained on)
FORMATS = ("auto", "chat", "alpaca", "prompt_completion", "multiple_choice")


def format_prompt(text: str, fmt: str, tokenizer: Any) -> list[int]:
    """Token ids of ``text`` wrapped as a training prompt of format ``fmt``."""
    from .tasks.instruction import ALPACA_PROMPT, token_ids
    from .tasks.multiple_choice import prompt as mc_prompt

    if fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise LoftUsageError("--format chat: the run's tokenizer has no chat template.")
        return token_ids(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                        tokenize=True))
    if fmt == "alpaca":
        text = ALPACA_PROMPT["no_input"].format(instruction=text)
    elif fmt == "multiple_choice":
        text = mc_prompt(text)
    return token_ids(tokenizer(text))


def generate(run: RunModel, text: str, *, fmt: str, max_new_tokens: int, temperature: float,
             stream: TextIO | None = None) -> str:
    """Complete ``text``; print the new tokens to ``stream`` as they come (``None``: don't) and
    return them decoded."""
    import torch
    from transformers import GenerationConfig

    from .tasks.instruction import stop_ids

    tokenizer, model = run.tokenizer, run.model
    ids = format_prompt(text, run.prompt_format if fmt == "auto" else fmt, tokenizer)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling, pad_token_id=pad,
                              eos_token_id=stop_ids(model, tokenizer),
                              **({"temperature": temperature, "top_p": 1.0, "top_k": 0} if sampling else {}))
    streamer = None if stream is None else _streamer_class()(tokenizer, stream)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=config, streamer=streamer)
    if stream is not None:
        stream.write("\n")
        stream.flush()
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def _streamer_class():
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        """``TextStreamer`` writing to a given stream instead of ``print``."""

        def __init__(self, tokenizer, stream: TextIO) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.stream = stream

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.stream.write(text)
            self.stream.flush()

    return Streamer


def _prompts(prompt: str | None, prompt_file: str | None, stdin: TextIO) -> Iterable[str]:
    """The prompt(s): ``--prompt``, the whole of ``--prompt-file``, or one per line typed."""
    if prompt is not None and prompt_file is not None:
        raise LoftUsageError("Give --prompt or --prompt-file, not both.")
    if prompt is not None:
        if not prompt.strip():
            raise LoftUsageError("--prompt is empty; give the text to complete.")
        yield prompt
        return
    if prompt_file is not None:
        path = Path(prompt_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LoftUsageError(f"--prompt-file {prompt_file!r} does not exist.") from None
        except (OSError, UnicodeDecodeError) as e:
            raise LoftUsageError(f"Cannot read --prompt-file {prompt_file!r}: {getattr(e, 'strerror', None) or e}.") from None
        if not text.strip():
            raise LoftUsageError(f"--prompt-file {prompt_file!r} is empty.")
        yield text.rstrip("\n")
        return
    interactive = stdin.isatty()
    if interactive:
        print("Type a prompt and press Enter (an empty line or Ctrl-D ends).", flush=True)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = stdin.readline()
        if not line or (interactive and not line.strip()):
            return
        if line.strip():
            yield line.rstrip("\n")


def run_generate(run_dir: str, *, prompt: str | None, prompt_file: str | None, fmt: str, max_new_tokens: int,
                 temperature: float, seed: int, stdin: TextIO | None = None, stdout: TextIO | None = None) -> list[str]:
    """What ``loft generate`` does: load the run, then complete each prompt, streaming."""
    if fmt not in FORMATS:
        raise LoftUsageError(f"Unknown --format {fmt!r}; choose one of: {', '.join(FORMATS)}.")
    if max_new_tokens < 1:
        raise LoftUsageError(f"--max-new-tokens must be >= 1, got {max_new_tokens}.")
    if not temperature >= 0:
        raise LoftUsageError(f"--temperature must be >= 0 (0: greedy), got {temperature}.")
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    prompts = _prompts(prompt, prompt_file, stdin)
    if prompt is not None or prompt_file is not None:
        prompts = list(prompts)  # check them before loading the model
    from transformers import set_seed

    from .load import quiet_libraries

    quiet_libraries()
    run = load_run(run_dir, "generate")
    set_seed(seed)
    return [generate(run, text, fmt=fmt, max_new_tokens=max_new_tokens, temperature=temperature, stream=stdout)
            for text in prompts]
