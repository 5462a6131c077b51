"""The exception tree of rankmill.

Every error that rankmill raises on purpose derives from :class:`RankmillError`; its message
says what to change. Callers catch the narrowest class they can handle::

    RankmillError
    ├── ConfigError            a pipeline YAML or --set override is invalid (dotted path in message)
    ├── DataError              input data is malformed (file and line in message)
    │   └── IngestError        an ingest check failed and the config does not tolerate it
    ├── StageError             a stage is misdeclared or misused (schemas, wiring, missing input)
    │   └── UnitFailed         one or more work units raised; committed units are kept
    ├── ManifestError          the run directory is inconsistent or written by another pipeline
    │   ├── CorruptData        a committed file or record does not match (recomputed by run)
    │   └── RunDirLocked       another rankmill run holds the run directory
    ├── LLMError               a call to an LLM endpoint cannot succeed as configured
    │   ├── LLMAuthError       401/403: the key named by api_key_env is missing or wrong
    │   ├── LLMRequestError    400/404/422: the request is wrong (unknown model, params, URL)
    │   ├── LLMQuotaError      429 that says the quota is exhausted (not a rate limit)
    │   ├── LLMRetryExhausted  transient errors outlasted the retry budget (attempts or time)
    │   ├── LLMUnreachable     connection refused, unknown host, no route: nothing at base_url
    │   ├── JournalError       a file of the run's LLM journal is unreadable (file in message)
    │   └── LocalServerError   the local llama.cpp server could not be started
    ├── BudgetExceeded         max_cost_usd / max_requests would be crossed; raise it and re-run
    └── PublishError           the Hub rejected a publish

An error class with ``fatal = True`` cannot heal by retrying other work units (a wrong key, a
wrong model name, an exhausted budget, a config mistake): the runner stops the whole stage at
the first one instead of letting every unit find out for itself.
"""

from __future__ import annotations

from typing import ClassVar


class RankmillError(Exception):
    """Base of every error rankmill raises on purpose."""

    # True: retrying other units cannot help; the runner stops the stage at the first one.
    fatal: ClassVar[bool] = False


class ConfigError(RankmillError):
    """A pipeline config or override is invalid."""

    fatal = True


class DataError(RankmillError):
    """Input data is malformed."""


class IngestError(DataError):
    """An ingest check failed and the config does not tolerate the finding."""


class StageError(RankmillError):
    """A stage is misdeclared or cannot run with the inputs it was given."""


class UnitFailed(StageError):
    """Some work units of a stage raised; the others are committed and kept."""

    def __init__(self, stage: str, failures: dict[str, str]):
        self.stage = stage
        self.failures = dict(failures)
        first = next(iter(self.failures.items()), ("?", "?"))
        super().__init__(
            f"stage {stage!r}: {len(self.failures)} work unit(s) failed "
            f"(first: unit {first[0]}: {first[1]}). Committed units are kept; "
            "fix the cause and run again to resume."
        )

    def __reduce__(self):
        return (type(self), (self.stage, self.failures))


class ManifestError(RankmillError):
    """The run directory is inconsistent."""


class CorruptData(ManifestError):
    """A committed file (or record) does not match what its record says."""

    def __init__(self, message: str, stage: str = "", unit_fp: str = ""):
        super().__init__(message)
        self.stage = stage
        self.unit_fp = unit_fp

    def __reduce__(self):  # keep stage and unit across processes (Ray)
        return (type(self), (str(self), self.stage, self.unit_fp))


class RunDirLocked(ManifestError):
    """Another rankmill run holds the run directory's lock."""

    fatal = True


class LLMError(RankmillError):
    """An LLM call cannot succeed as configured."""


class LLMAuthError(LLMError):
    """The endpoint rejected the credentials."""

    fatal = True


class LLMRequestError(LLMError):
    """The endpoint rejected the request as malformed."""

    fatal = True


class LLMQuotaError(LLMError):
    """The endpoint's quota is exhausted; retrying will not help."""

    fatal = True


class LLMRetryExhausted(LLMError):
    """Transient errors persisted past the retry budget."""


class LLMUnreachable(LLMError):
    """Nothing answers at the endpoint's address (connection refused, unknown host)."""

    fatal = True


class JournalMiss(LLMError):
    """A gateway that answers only from the journal (``journal_only``) was asked something the
    journal lacks; nothing was sent."""


class JournalError(LLMError):
    """A file of the run's LLM journal cannot be read; the message names it and what to do."""

    fatal = True


class LocalServerError(LLMError):
    """The local LLM server could not be started or stopped."""

    fatal = True


class BudgetExceeded(RankmillError):
    """A run-level budget (cost or requests) would be crossed."""

    fatal = True


class PublishError(RankmillError):
    """Publishing to the Hub failed."""
