"""Who may call what: the one table from every RPC to the role it needs and the largest request it takes.

Roles (each with its own credential, a bearer token read from a file or an env var filled from a
Kubernetes Secret, compared in constant time):

- ``open``: anyone who reaches the port (the NetworkPolicies decide who can). Inference (Generate, Score,
  LogProbs), descriptions and progress (Get*, List*, WatchRun, GetStats), Export of the stored labels (the
  feedback port admits only the trainer and the Ray head) and health. Nothing open writes, and every open
  call is bounded (request size here, list and token counts in the service).
- ``labeler``: leases and submits labels (NextTask, SubmitRanking, SkipTask, SubmitDemonstration, and the labeling
  page's /api/next and /api/rankings, which are those RPCs over HTTP). Each labeler may have a credential of
  their own (``labelers_dir``): it fixes the labeler id they label under (:meth:`Credentials.labeler_id`). A
  team's shared labeler credential leaves the id to its holders.
- ``operator``: changes what is served, trained or labelled: UpdateWeights, LoadModel, StartRun, CancelRun,
  AddPrompts, CreateComparisonTasks. The operator may also do everything a labeler may
  (the pipeline's simulated labelers label with the operator credential).

A method missing from the table is refused (PERMISSION_DENIED): a new RPC must be classified here, and
``tests/test_security_roles.py`` checks that every RPC of every .proto is. Control methods (operator, and
health) do not count against the data-plane caps, so they answer while the data plane is saturated.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

import grpc

from chatrl.services.runtime.errors import ServiceError

OPEN, LABELER, OPERATOR = "open", "labeler", "operator"
ROLES = (OPEN, LABELER, OPERATOR)
# a credential of role r may call methods needing any role in GRANTS[r]
GRANTS = {LABELER: {OPEN, LABELER}, OPERATOR: {OPEN, LABELER, OPERATOR}}

KiB, MiB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Rule:
    role: str
    max_request_bytes: int  # one request message (one chunk of a client stream); beyond: RESOURCE_EXHAUSTED


_P, _RW, _RF, _T, _F = ("chatrl.v1.PolicyInferenceService", "chatrl.v1.RewardScoringService",
                        "chatrl.v1.ReferenceModelService", "chatrl.v1.TrainerService", "chatrl.v1.FeedbackService")

# Full method name (without the leading "/") → Rule. Sizes: weight chunks are 1 MiB (+ framing and
# metadata); Generate ≤ 256 prompts; Score/LogProbs ≤ 4096 items of model-length token ids; the
# feedback writes are bounded by the store's caps (20k-character prompts, K ≤ max_k).
METHODS: dict[str, Rule] = {
    f"{_P}/Generate": Rule(OPEN, 8 * MiB),
    f"{_P}/GenerateStream": Rule(OPEN, 1 * MiB),
    f"{_P}/UpdateWeights": Rule(OPERATOR, 4 * MiB),
    f"{_P}/GetModelInfo": Rule(OPEN, 4 * KiB),
    f"{_RW}/Score": Rule(OPEN, 32 * MiB),
    f"{_RW}/LoadModel": Rule(OPERATOR, 256 * KiB),  # an over-long path answers INVALID_ARGUMENT itself
    f"{_RW}/GetModelInfo": Rule(OPEN, 4 * KiB),
    f"{_RF}/LogProbs": Rule(OPEN, 32 * MiB),
    f"{_RF}/LoadModel": Rule(OPERATOR, 256 * KiB),
    f"{_RF}/GetModelInfo": Rule(OPEN, 4 * KiB),
    f"{_T}/StartRun": Rule(OPERATOR, 1 * MiB),
    f"{_T}/GetRun": Rule(OPEN, 4 * KiB),
    f"{_T}/ListRuns": Rule(OPEN, 4 * KiB),
    f"{_T}/WatchRun": Rule(OPEN, 4 * KiB),
    f"{_T}/CancelRun": Rule(OPERATOR, 4 * KiB),
    f"{_T}/ListCheckpoints": Rule(OPEN, 4 * KiB),
    f"{_F}/AddPrompts": Rule(OPERATOR, 24 * MiB),
    f"{_F}/CreateComparisonTasks": Rule(OPERATOR, 24 * MiB),
    f"{_F}/NextTask": Rule(LABELER, 4 * KiB),
    f"{_F}/SubmitRanking": Rule(LABELER, 16 * KiB),
    f"{_F}/SkipTask": Rule(LABELER, 16 * KiB),
    f"{_F}/SubmitDemonstration": Rule(LABELER, 1 * MiB),
    f"{_F}/Export": Rule(OPEN, 4 * KiB),
    f"{_F}/GetStats": Rule(OPEN, 4 * KiB),
    "grpc.health.v1.Health/Check": Rule(OPEN, 4 * KiB),
    "grpc.health.v1.Health/Watch": Rule(OPEN, 4 * KiB),
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Rule(OPEN, 64 * KiB),
}
HEALTH_CHECK = "grpc.health.v1.Health/Check"


def rule(method: str) -> Rule | None:
    """The rule of a method, given as ``/pkg.Service/Method`` or ``pkg.Service/Method``."""
    return METHODS.get(method.lstrip("/"))


def is_control(method: str) -> bool:
    """Operator calls and the health check: served from reserved capacity, never queued behind data."""
    r = rule(method)
    return r is not None and (r.role == OPERATOR or method.lstrip("/") == HEALTH_CHECK)


def max_request_bytes(service_full_names: list[str]) -> int:
    """The largest request any method of these services takes (the server's transport-level cap)."""
    sizes = [r.max_request_bytes for m, r in METHODS.items() if m.split("/")[0] in service_full_names]
    return max(sizes, default=64 * KiB)


class CredentialError(ValueError):
    """A credential is configured but unusable (missing file, empty value): the service must not start."""


def _read_secret(path: str, what: str) -> str:
    p = Path(path)
    try:
        value = p.read_text().strip()
    except OSError as e:
        raise CredentialError(f"{what}: cannot read {path}: {e.strerror}") from None
    if not value:
        raise CredentialError(f"{what}: {path} is empty (an empty value is not a credential)")
    return value


def load_credential(env: str, path: str, what: str) -> str:
    """A role's credential: the file (a mounted Secret) if ``path`` is set, else the env var named ``env``
    (from a Secret through secretKeyRef). '' = none configured (an empty env value is none, not a
    credential that matches an empty header)."""
    if path:
        return _read_secret(path, what)
    return (os.environ.get(env, "") if env else "").strip()


LABELER_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")  # a Kubernetes Secret key, and a store id


def load_labelers(path: str, what: str) -> tuple[tuple[str, str], ...]:
    """Per-labeler credentials from a directory — a Kubernetes Secret mounted as a volume, one key per
    labeler: the file name is the labeler id, its content that labeler's token (the volume's own
    ``..data`` and ``..<timestamp>`` entries are skipped). '' = none configured. Raises :class:`CredentialError` for an
    unreadable directory, a bad id, an empty token or two labelers sharing one."""
    if not path:
        return ()
    d = Path(path)
    if not d.is_dir():
        raise CredentialError(f"{what}: {path} is not a directory (one file per labeler: name = labeler id, "
                              f"content = token)")
    out, seen = [], set()
    for f in sorted(d.iterdir()):
        if f.name.startswith("..") or f.is_dir():  # a mounted Secret's ..data and ..<timestamp> entries
            continue
        if not LABELER_ID.fullmatch(f.name):
            raise CredentialError(f"{what}: {f.name[:64]!r} is not a labeler id (1-128 of A-Z a-z 0-9 . _ -)")
        token = _read_secret(str(f), what)
        if token in seen:
            raise CredentialError(f"{what}: labeler {f.name!r} has the same token as another labeler")
        seen.add(token)
        out.append((f.name, token))
    if not out:
        raise CredentialError(f"{what}: {path} holds no labeler credentials")
    return tuple(out)


@dataclass(frozen=True)
class Caller:
    """Who called: the role their credential grants, and for a per-labeler credential the labeler it
    belongs to (None: the operator, the shared labeler credential, or development mode)."""

    role: str
    labeler: str | None = None


@dataclass(frozen=True)
class Credentials:
    """The credential of each role this server knows; none at all = development mode (everything open,
    allowed on loopback only unless ``allow_insecure``). ``labelers``: (labeler id, token) pairs, one
    credential per labeler, which also fixes the labeler id its holder labels under; ``labeler`` is one
    credential shared by a team, whose holders declare their labeler id themselves."""

    operator: str = ""
    labeler: str = ""
    labelers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        shared = [t for t in (self.operator, self.labeler) if t]
        if any(tok in shared for _, tok in self.labelers) or (self.labeler and self.labeler == self.operator):
            raise CredentialError("a labeler's credential equals another role's: every credential must differ")

    @property
    def enabled(self) -> bool:
        return bool(self.operator or self.labeler or self.labelers)

    def identify(self, presented: str) -> Caller | None:
        """The caller whose credential was presented, or None. Every configured credential is compared
        (hmac.compare_digest), whatever matched, so the time does not tell which one was close."""
        got = presented.encode()
        found = None
        candidates = [(Caller(OPERATOR), self.operator), (Caller(LABELER), self.labeler),
                      *((Caller(LABELER, who), tok) for who, tok in self.labelers)]
        for caller, tok in candidates:
            if tok and hmac.compare_digest(got, tok.encode()):
                found = found or caller
        return found

    def caller(self, authorization: str) -> Caller:
        """The caller of an already authorized call (metadata/header ``authorization``): open when auth is
        off or nothing valid was presented."""
        scheme, _, token = authorization.partition(" ")
        if not self.enabled or scheme.lower() != "bearer" or not token:
            return Caller(OPEN)
        return self.identify(token) or Caller(OPEN)

    def labeler_id(self, caller: Caller, requested: str, field: str = "labeler_id") -> str:
        """The labeler id a call labels under: a per-labeler credential's own (``requested`` may be empty or
        must equal it: PERMISSION_DENIED otherwise); for the operator (the pipeline's simulated labelers)
        and development mode, ``requested`` as given; for the shared labeler credential, ``requested`` unless
        it is the id of a labeler with a credential of their own (PERMISSION_DENIED: only they label as
        themselves)."""
        if caller.labeler is not None:
            if requested in ("", caller.labeler):
                return caller.labeler
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               f"{field}: {requested[:64]!r} is not the labeler of the credential presented "
                               f"({caller.labeler!r}); a labeler labels only under their own id")
        if caller.role == LABELER and any(requested == who for who, _ in self.labelers):
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               f"{field}: {requested[:64]!r} has a credential of their own; the shared labeler "
                               f"credential cannot label under that id")
        return requested

    def authorize(self, method: str, authorization: str) -> Caller:
        """The caller of ``method`` (its metadata/header ``authorization: Bearer <token>``), or a
        ServiceError: UNAUTHENTICATED without a valid credential, PERMISSION_DENIED with one of a role
        that may not call ``method`` or for a method missing from the table."""
        short = method.rsplit("/", 1)[-1]
        r = rule(method)
        if r is None:
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, f"{short}: not in the role table (refused)")
        if not self.enabled or r.role == OPEN:  # who called an open method is not needed: compare nothing
            return Caller(OPEN)
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED,
                               f"{short} needs the {r.role} credential as 'authorization: Bearer <token>'")
        caller = self.identify(token)
        if caller is None:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, f"{short}: the credential presented is not valid (it needs the "
                               f"{r.role} credential as 'authorization: Bearer <token>')")
        if r.role not in GRANTS[caller.role]:
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               f"{short} needs the {r.role} role; the credential presented is a {caller.role}'s")
        return caller


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name, or '' / '0.0.0.0' / '::' (every interface)


def check_exposure(service: str, hosts: list[str], creds: Credentials, allow_insecure: bool) -> None:
    """Refuse (before anything binds) to listen beyond loopback with no credential: every write would be
    open to whoever reaches the address. ``allow_insecure: true`` says that is intended."""
    exposed = [h for h in hosts if not is_loopback(h)]
    if exposed and not creds.operator and not allow_insecure:
        raise CredentialError(
            f"{service}: refusing to listen on {exposed[0]!r} without an operator credential (set the env var "
            f"named by auth_token_env, or auth_token_file; an empty value is not a credential), or set "
            f"allow_insecure: true to serve every method unauthenticated")
    if (creds.labeler or creds.labelers) and not creds.operator:
        raise CredentialError(f"{service}: a labeler credential without an operator credential would leave "
                              f"the operator methods unreachable; configure both")
