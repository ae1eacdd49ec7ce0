"""medbatch's exceptions: each message says what happened and what the operator can do about it."""

from __future__ import annotations


class MedbatchError(Exception):
    """Base of every error medbatch raises on purpose."""


class ConfigurationError(MedbatchError):
    """A setting or an installed component is missing or wrong; fix the environment, then retry."""


class ServiceStartError(MedbatchError):
    """A local server (redis-server, tritonserver, a worker) did not start or become ready."""


class SupervisionError(MedbatchError):
    """A process ``medbatch up`` started kept exiting: the stack stops, to be restarted whole."""


class InputError(MedbatchError):
    """The submitted file cannot be read as a whole (not a single bad row: those are recorded)."""


class SubmissionInProgressError(InputError):
    """The same content is being submitted by another process at this very moment."""


class ExtractRejectedError(InputError):
    """A dropped or submitted file is not an EHR extract; the rejection is recorded as a job."""

    def __init__(self, message: str, job_id: int) -> None:
        super().__init__(message)
        self.job_id = job_id


class NotFoundError(MedbatchError):
    """The thing asked for does not exist (a job, a study, a token)."""


class AuthenticationError(MedbatchError):
    """A request without a valid API token (none, unknown or revoked)."""


class PermissionDeniedError(MedbatchError):
    """The API token is valid but lacks the scope this operation needs."""


class JobNotFoundError(NotFoundError):
    """No job with that id; `medbatch jobs` lists the ones that exist."""


class InferenceError(MedbatchError):
    """Triton answered, but with an error about this request: retrying will not help."""


class InferenceUnavailableError(MedbatchError):
    """Triton cannot be reached or the model is not ready: the job waits and retries."""


class AuditChainError(MedbatchError):
    """The audit log's hash chain is broken: a row was altered, removed or inserted."""


class InstanceRefusedError(MedbatchError):
    """A received DICOM instance cannot be stored; ``status`` is the C-STORE status sent back."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class DicomSendError(MedbatchError):
    """The configured destination AE did not accept a result (unreachable, refused, failed)."""


class DicomDestinationUnavailableError(DicomSendError):
    """The destination AE could not be reached (or refused transiently): the send waits."""


class StorageError(MedbatchError):
    """Object storage (MEDBATCH_STORAGE_URL) refused an operation or holds no such object."""


class StorageUnavailableError(StorageError):
    """Object storage could not be reached: a C-STORE is answered 0xA700 (the sender retries),
    a job waits with back-off and then fails; `medbatch retry` resumes it once storage is back."""
