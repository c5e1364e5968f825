"""The ``selfbudget`` command: ``generate`` answers one problem for a person; ``eval`` runs evaluation.

``selfbudget generate "What is 12*7?" [--model PATH] [--budget N] [--max-tokens N] [--temperature T]``
prints the response on stdout as it is written; on stderr it says the budget as soon as the model has
stated it, then keeps a progress line against that budget with an ETA from the measured tokens/s.
Ctrl-C stops cleanly: what was produced stays printed and the exit code is 130.

``selfbudget eval [hydra overrides ...]`` is the same as ``selfbudget-eval`` (see :mod:`selfbudget_pl.evaluate`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from typing import TYPE_CHECKING, Optional, Sequence, TextIO

if TYPE_CHECKING:  # the real imports load torch; `selfbudget --help` should not wait for it
    from selfbudget_pl.generate import BudgetEvent, TokenEvent

EXIT_INTERRUPTED = 130  # the shell convention for "terminated by SIGINT"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``selfbudget`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "eval":
        from selfbudget_pl import evaluate

        # Hydra reads its overrides from sys.argv.
        sys.argv = [f"{sys.argv[0]} eval", *args.overrides]
        evaluate.main()
        return 0
    from selfbudget_pl.schema import ConfigError

    try:
        return _generate(args)
    except ConfigError as error:  # checked before the weights load
        print(f"selfbudget generate: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the model was still loading
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfbudget", description="SelfBudgeter: budgeted math reasoning.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="answer one problem, streaming, with budget and ETA")
    generate.add_argument("problem", help="the problem text")
    generate.add_argument("--model", default=None, help="checkpoint dir or hub id (default: the tiny model)")
    generate.add_argument("--budget", type=_positive_int, default=None, help="pre-fill <budget>N</budget>")
    generate.add_argument("--max-tokens", type=_positive_int, default=2048, help="hard ceiling on new tokens")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--seed", type=int, default=None, help="sampling seed")
    generate.add_argument("--template", default="{problem}", help="user message template with {problem}")
    generate.add_argument("--system-prompt", default=None, help="system message, if any")
    generate.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    generate.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    evaluate = commands.add_parser("eval", help="evaluate a model (Hydra overrides follow)")
    evaluate.add_argument("overrides", nargs=argparse.REMAINDER, help="e.g. model_path=out/export budget=[100,200]")
    return parser


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return number


def _generate(args: argparse.Namespace) -> int:
    from selfbudget_pl.config.checks import check_generation
    from selfbudget_pl.data.prompts import build_prompt, encode_prompt
    from selfbudget_pl.format import OutputFormat
    from selfbudget_pl.generate import BudgetEvent, DoneEvent, TokenEvent, stream_generation
    from selfbudget_pl.models import ModelLoader

    check_generation(args.model, args.max_tokens, args.temperature, args.device, args.dtype)
    loader = ModelLoader(name_or_path=args.model, dtype=args.dtype)
    tokenizer = loader.load_tokenizer()
    prompt = build_prompt(args.problem, tokenizer, template=args.template, system_prompt=args.system_prompt)
    output_format = OutputFormat()
    prefix = output_format.budget_prefix(args.budget) if args.budget is not None else ""
    context = len(encode_prompt(prompt, tokenizer)) + len(tokenizer.encode(prefix, add_special_tokens=False))
    check_generation(args.model, args.max_tokens, args.temperature, args.device, args.dtype, prompt_tokens=context)
    model = loader.load_model().to(args.device)
    display = _Display(sys.stdout, sys.stderr)
    events = stream_generation(
        model,
        tokenizer,
        prompt,
        output_format,
        max_tokens=args.max_tokens,
        budget=args.budget,
        temperature=args.temperature,
        seed=args.seed,
    )
    reason, n_tokens = "interrupted", 0
    try:
        for event in events:
            if isinstance(event, BudgetEvent):
                display.budget(event)
                if event.source == "prefill":
                    display.text(output_format.budget_prefix(event.budget), None)
            elif isinstance(event, TokenEvent):
                n_tokens = event.n_tokens
                display.text(event.text, event)
            elif isinstance(event, DoneEvent):
                reason, n_tokens = event.reason, event.n_tokens
    except KeyboardInterrupt:  # arrived while we were printing rather than inside the model
        events.close()
    display.finish(reason, n_tokens)
    return EXIT_INTERRUPTED if reason == "interrupted" else 0


class _Display:
    """Response text on stdout; budget, progress and ETA on stderr.

    When both streams are the same terminal, the progress line is kept on the row below the text with
    ANSI cursor moves, so streaming text and a live status do not overwrite each other. When only
    stderr is a terminal it gets a ``\\r`` status line; when neither is, only the budget and a final
    summary are written (logs stay readable).
    """

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err
        self.err_tty = err.isatty()
        self.shared_tty = self.err_tty and out.isatty()
        self.width = shutil.get_terminal_size().columns
        self.column = 0  # cursor column at the end of the text (shared terminal)
        self.status_drawn = False
        self.current_budget: Optional[int] = None
        self.budget_source = ""
        self.started = time.perf_counter()
        self.last: Optional[TokenEvent] = None

    def budget(self, event: BudgetEvent) -> None:
        self.current_budget = event.budget
        self.budget_source = "pre-filled" if event.source == "prefill" else "the model's forecast"
        if not self.shared_tty:
            self._clear_status()
            self.err.write(f"budget: {self.current_budget} tokens ({self.budget_source})\n")
            self.err.flush()

    def text(self, piece: str, event: Optional[TokenEvent]) -> None:
        if event is not None:
            self.last = event
        if piece:
            self._clear_status()
            self.out.write(piece)
            self.out.flush()
            for char in piece:
                self.column = 0 if char in "\r\n" else (self.column + 1) % self.width
        self._draw_status()

    def finish(self, reason: str, n_tokens: int) -> None:
        self._clear_status()
        self.out.write("\n")
        self.out.flush()
        elapsed = time.perf_counter() - self.started
        note = {"eos": "done", "ceiling": "stopped at the --max-tokens ceiling", "interrupted": "interrupted"}[reason]
        line = f"{note}: {n_tokens} tokens in {elapsed:.2f} s"
        spent = self.last.solution_tokens if self.last is not None else None
        if self.current_budget is not None and spent is not None:
            line += f"; solution {spent}/{self.current_budget} budgeted tokens ({spent / self.current_budget:.0%})"
        self.err.write(line + "\n")
        self.err.flush()

    def _status(self) -> str:
        event = self.last
        if event is None:
            return ""
        rate = f"{event.tokens_per_s:.1f} tok/s"
        spent = event.solution_tokens
        if self.current_budget is None or spent is None:
            return f"{event.n_tokens} tokens, {rate}, budget not stated yet"
        fraction = min(1.0, spent / self.current_budget)
        bar = "#" * int(20 * fraction) + "-" * (20 - int(20 * fraction))
        eta_text = f"ETA {event.eta_s:.1f} s" if event.eta_s is not None else "ETA ?"
        budget = f"budget {self.current_budget} ({self.budget_source})"
        return f"{budget} [{bar}] {spent}/{self.current_budget}, {rate}, {eta_text}"

    def _draw_status(self) -> None:
        if not self.err_tty or self.last is None:
            return
        status = self._status()[: self.width - 1]
        # Shared terminal: a new row below the text; otherwise redraw stderr's own line.
        self.err.write(("\n" if self.shared_tty else "\r") + "\033[K" + status)
        self.err.flush()
        self.status_drawn = True

    def _clear_status(self) -> None:
        if not self.status_drawn:
            return
        if self.shared_tty:
            # Erase the status row, then go back up to where the text ended.
            self.err.write(f"\r\033[K\033[A\033[{self.column + 1}G")
        else:
            self.err.write("\r\033[K")
        self.err.flush()
        self.status_drawn = False


if __name__ == "__main__":
    sys.exit(main())
