"""Errors users see. Each names the file, the field and the fix; the CLI maps them to exit codes."""

from __future__ import annotations

from pathlib import Path


class Qwen3CompileError(Exception):
    """Base class. `exit_code` is what the CLI returns for it."""

    exit_code = 1

    def __init__(
        self,
        problem: str,
        *,
        file: str | Path | None = None,
        field: str | None = None,
        fix: str | None = None,
    ):
        self.problem = problem
        self.file = str(file) if file is not None else None
        self.field = field
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        where = []
        if self.file:
            where.append(f"in {self.file}")
        if self.field:
            where.append(f"field '{self.field}'")
        head = f"{' '.join(where)}: " if where else ""
        text = f"{head}{self.problem}"
        if self.fix:
            text += f" Fix: {self.fix}"
        return text


class BadInputError(Qwen3CompileError):
    """The user's input (checkpoint, option, file) is wrong: exit code 2."""

    exit_code = 2


class CheckFailedError(Qwen3CompileError):
    """The input was fine but a check the user asked for failed (parity, fit): exit code 1."""

    exit_code = 1
