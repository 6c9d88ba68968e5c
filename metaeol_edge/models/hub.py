"""Any GGUF file on the Hugging Face Hub: ``hf:OWNER/REPO/FILE.gguf``, or ``hf:OWNER/REPO:QUANT``.

``hf:OWNER/REPO:Q4_K_M`` picks the repository's file of that quantization
(``hf:OWNER/REPO`` alone means Q4_K_M, as llama.cpp's ``-hf`` does); a split
model's parts are pulled together. Files land in ``store/hf/OWNER/REPO/FILE``
with the registry's discipline: a temporary file beside the target, the hub's
published size and SHA-256 checked before the file takes its name, a stamp
(size, mtime, SHA-256) so that later runs neither rehash nor trust a file that
changed since. A file already in the Hugging Face cache is used from there.

The published SHA-256 and size come from the hub's API
(``/api/models/REPO/revision/REV?blobs=true``: each LFS file's ``lfs.sha256``),
else from the ``X-Linked-Etag``/``ETag`` and ``X-Linked-Size`` headers of a
HEAD on ``/REPO/resolve/REV/FILE`` (what huggingface_hub reads), else from the
LFS pointer at ``/REPO/raw/REV/FILE``. An interrupted download keeps its
``.part`` file (named by the SHA-256 it must reach) and the next pull resumes it
with a ``Range`` request; a download whose SHA-256 differs is deleted, so
nothing that looks valid is left. ``HF_ENDPOINT`` points at a mirror;
``HF_TOKEN`` is sent as a Bearer token to the hub's own host only, never to the
CDN host a file redirects to.

Plain ``urllib`` rather than ``huggingface_hub``: the base install stays without
that dependency (it comes only with the ``reference`` extra), and
``hf_hub_download`` checks a download's size, not its SHA-256, and writes into
its own cache layout (blobs and symlinks, or the Xet transfer protocol when
``hf_xet`` is installed) where the store's check-then-rename and stamp would
have to be rebuilt around it. What is needed here is three HTTP requests.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from metaeol_edge.errors import DownloadError, ModelError
from metaeol_edge.models import digest, found, registry, store
from metaeol_edge.models.modelfile import SPLIT_NAME, split_paths

DEFAULT_QUANT = "Q4_K_M"  # llama.cpp's choice for `-hf OWNER/REPO` without a tag
CHUNK = 1 << 20
TIMEOUT = 60
_NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class HubRef:
    """What an ``hf:`` name asks for: a repository, and a file in it or a quantization."""

    owner: str
    repo: str
    file: str | None = None
    quant: str | None = None
    revision: str = "main"

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.repo}"

    def name_of(self, file: str) -> str:
        return f"hf:{self.repo_id}/{file}"


@dataclass(frozen=True)
class RemoteFile:
    path: str  # in the repository
    size: int | None
    sha256: str | None  # published by the hub (LFS); None: the hub gave none


def parse(name: str) -> HubRef:
    """``hf:OWNER/REPO/PATH/FILE.gguf`` or ``hf:OWNER/REPO[:QUANT]``; ModelError if malformed."""
    rest = name.removeprefix("hf:")
    bits = rest.split("/", 2)
    usage = "use hf:OWNER/REPO/FILE.gguf or hf:OWNER/REPO:QUANT (e.g. hf:bartowski/Qwen2.5-1.5B-Instruct-GGUF:Q4_K_M)"
    if len(bits) < 2:
        raise ModelError(f"{name!r} is not a Hugging Face model name: {usage}")
    owner, repo = bits[0], bits[1]
    file = quant = None
    if len(bits) == 3:
        file = bits[2]
        if not is_repo_file(file):
            raise ModelError(f"{name!r} names no .gguf file in the repository: {usage}")
    else:
        repo, _, quant = repo.partition(":")
        quant = quant or DEFAULT_QUANT
    if not _NAME_PART.fullmatch(owner) or not _NAME_PART.fullmatch(repo):
        raise ModelError(f"{name!r} is not a Hugging Face model name: {usage}")
    return HubRef(owner, repo, file, quant)


def is_repo_file(file: str) -> bool:
    """A ``.gguf`` path inside a repository: relative, no empty, ``.`` or ``..`` part. Names typed by a
    user and names taken from a listing (a mirror's ``HF_ENDPOINT`` can send any) pass the same check."""
    parts = file.split("/")
    return file.endswith(".gguf") and not PurePosixPath(file).is_absolute() and not {"", ".", ".."} & set(parts)


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", registry.HF_BASE).rstrip("/")  # the variable huggingface_hub reads


def target_path(ref: HubRef, file: str) -> Path:
    return found.hub_store() / ref.owner / ref.repo / file


# -- a name -> a local file ---------------------------------------------------------------------


def resolve(name: str, pull: bool = True, progress: store.Progress | None = None) -> Path:
    """The local file of an ``hf:`` name: pulled before, in the Hugging Face cache, or pulled now."""
    ref = parse(name)
    local = _local(ref)
    if local is not None:
        return local
    if not pull:
        raise ModelError(f"{name} is not pulled yet; run: metaeol models pull {name}")
    return pull_model(name, progress=progress)


def _matches_quant(file: str, quant: str) -> bool:
    stem = PurePosixPath(file).name
    m = SPLIT_NAME.match(stem)
    stem = m["prefix"] if m else stem.removesuffix(".gguf")
    return re.search(rf"(?:^|[-._]){re.escape(quant)}(?:$|[-.])", stem, re.IGNORECASE) is not None


def _local(ref: HubRef) -> Path | None:
    models = found.hf_local(ref.owner, ref.repo)
    if ref.file is not None:
        hits = [m for m in models if m.name == ref.name_of(ref.file)]
    else:
        quant = ref.quant or DEFAULT_QUANT
        hits = [
            m
            for m in models
            if _matches_quant(m.name.removeprefix(f"hf:{ref.repo_id}/"), quant)
            and not m.path.name.lower().startswith("mmproj")
        ]
        if len({m.name for m in hits}) != 1:
            return None  # none, or several: the hub's listing decides
    if not hits:
        return None
    model = hits[0]
    if any(not p.is_file() for p in model.parts):
        return None  # a split model pulled in part: the pull goes on where it stopped
    if model.source == "hf-pull":
        for part in model.parts:
            _check_pulled(part, model.name)
    return model.path


def _check_pulled(path: Path, name: str) -> None:
    """Refuse a pulled file that changed since its SHA-256 was checked (rehashed only if size or mtime moved)."""
    if store.stamped_sha256(path):
        return
    repair = f"run: metaeol models pull {name} --force"
    try:
        recorded = json.loads(store._stamp_path(path).read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"{path} was not checked against the hub's SHA-256; {repair}") from None
    if digest.sha256_file(path) != recorded:
        raise ModelError(f"{path} does not match the SHA-256 it was pulled with: damaged or replaced; {repair}")
    store._stamp(path, recorded)


# -- what the hub publishes ---------------------------------------------------------------------


class _Redirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects; the token goes along only to the host it was meant for."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if (
            new is not None
            and auth
            and urllib.parse.urlsplit(newurl).netloc == urllib.parse.urlsplit(endpoint()).netloc
        ):
            new.add_unredirected_header("Authorization", auth)
        return new


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # the redirect itself carries X-Linked-Etag: keep it as the answer


def _request(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> urllib.request.Request:
    req = urllib.request.Request(url, method=method, headers={"User-Agent": "metaeol-edge", **(headers or {})})
    token = os.environ.get("HF_TOKEN")
    if token and urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(endpoint()).netloc:
        req.add_unredirected_header("Authorization", f"Bearer {token}")  # not forwarded by urllib's redirects
    return req


def _open(req: urllib.request.Request, follow: bool = True):
    return urllib.request.build_opener(_Redirect if follow else _NoRedirect).open(req, timeout=TIMEOUT)


def _http_error(what: str, exc: Exception) -> DownloadError:
    hint = ""
    if isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403):
        hint = " (a gated or private repository: set HF_TOKEN to a token that may read it)"
    return DownloadError(f"{what}: {exc}{hint}")


def _quote(path: str) -> str:
    return urllib.parse.quote(path, safe="/")


def _listing(ref: HubRef) -> dict[str, RemoteFile]:
    """Every file of the repository with its published size and SHA-256, from the hub's API."""
    url = f"{endpoint()}/api/models/{ref.repo_id}/revision/{_quote(ref.revision)}?blobs=true"
    try:
        with _open(_request(url)) as resp:
            data = json.load(resp)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _http_error(f"listing {ref.repo_id} on {endpoint()} failed", exc) from exc
    files = {}
    for sibling in data.get("siblings") or []:
        path = sibling.get("rfilename")
        if not isinstance(path, str):
            continue
        lfs = sibling.get("lfs") or {}
        sha = lfs.get("sha256") if isinstance(lfs.get("sha256"), str) else None
        size = lfs.get("size", sibling.get("size"))
        files[path] = RemoteFile(path, size if isinstance(size, int) else None, sha)
    return files


def _etag_sha(value: str | None) -> str | None:
    tag = (value or "").strip().removeprefix("W/").strip('"')
    return tag if found.SHA256_HEX.fullmatch(tag) else None


def _head(ref: HubRef, file: str) -> RemoteFile:
    """Size and SHA-256 of one file without the API: the resolve endpoint's headers, else its LFS pointer."""
    url = f"{endpoint()}/{ref.repo_id}/resolve/{_quote(ref.revision)}/{_quote(file)}"
    try:
        with _open(_request(url, "HEAD"), follow=False) as resp:
            headers = resp.headers
    except urllib.error.HTTPError as exc:
        if not 300 <= exc.code < 400:
            raise _http_error(f"{ref.name_of(file)}: HEAD {url} failed", exc) from exc
        headers = exc.headers
    except (OSError, http.client.HTTPException) as exc:
        raise _http_error(f"{ref.name_of(file)}: HEAD {url} failed", exc) from exc
    sha = _etag_sha(headers.get("X-Linked-Etag")) or _etag_sha(headers.get("ETag"))
    size = headers.get("X-Linked-Size") or headers.get("Content-Length")
    size = int(size) if size and size.isdigit() else None
    if sha is None or size is None:
        pointer = _lfs_pointer(ref, file)
        sha, size = pointer or (sha, size)
    return RemoteFile(file, size, sha)


def _lfs_pointer(ref: HubRef, file: str) -> tuple[str, int] | None:
    url = f"{endpoint()}/{ref.repo_id}/raw/{_quote(ref.revision)}/{_quote(file)}"
    try:
        with _open(_request(url)) as resp:
            text = resp.read(1024).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return None
    oid, size = re.search(r"^oid sha256:([0-9a-f]{64})$", text, re.M), re.search(r"^size (\d+)$", text, re.M)
    return (oid[1], int(size[1])) if oid and size else None


def _remote_files(ref: HubRef) -> list[RemoteFile]:
    """The files to pull for a name: the file asked for (all its parts), or the one of the quantization."""
    try:
        listing: dict[str, RemoteFile] | None = _listing(ref)
        api_error: DownloadError | None = None
    except DownloadError as exc:  # a mirror without the API: ask the file endpoints themselves
        listing, api_error = None, exc
    if listing is not None:
        unsafe = sorted(f for f in listing if f.endswith(".gguf") and not is_repo_file(f))
        if unsafe:
            raise DownloadError(
                f"the listing of {ref.repo_id} from {endpoint()} names {unsafe[0]!r}, which is not a file inside "
                "the repository: refused (check HF_ENDPOINT)"
            )
    if ref.file is not None:
        wanted = [p.as_posix() for p in split_paths(ref.file)]
        if listing is None:
            return [_head(ref, f) for f in wanted]
        missing = [f for f in wanted if f not in listing]
        if missing:
            ggufs = sorted(f for f in listing if f.endswith(".gguf"))
            raise DownloadError(f"{ref.repo_id} has no file {missing[0]}; its GGUF files: {', '.join(ggufs) or 'none'}")
        return [listing[f] if listing[f].sha256 else _head(ref, f) for f in wanted]
    if listing is None:
        raise DownloadError(f"choosing {ref.quant} in {ref.repo_id} needs its file list: {api_error}")
    ggufs = [f for f in listing if f.endswith(".gguf") and not PurePosixPath(f).name.lower().startswith("mmproj")]
    firsts = sorted(f for f in ggufs if _is_first(f))  # a split model is chosen by its first part
    chosen = [f for f in firsts if _matches_quant(f, ref.quant or DEFAULT_QUANT)]
    if len(chosen) != 1:
        what = "several files" if chosen else "no file"
        raise DownloadError(
            f"{ref.repo_id} has {what} of quantization {ref.quant}: {', '.join(chosen or firsts) or 'no GGUF files'}"
            f"; name one: hf:{ref.repo_id}/FILE.gguf"
        )
    return _remote_files(HubRef(ref.owner, ref.repo, chosen[0], None, ref.revision))


def _is_first(file: str) -> bool:
    m = SPLIT_NAME.match(PurePosixPath(file).name)
    return m is None or int(m["no"]) == 1


# -- the pull -------------------------------------------------------------------------------------


def pull_model(name: str, progress: store.Progress | None = None, force: bool = False) -> Path:
    """Pull an ``hf:`` model into the store (every part of a split one); return the file llama.cpp is given."""
    ref = parse(name)
    if not force:
        local = _local(ref)
        if local is not None:
            return local  # pulled before and unchanged, or in the Hugging Face cache: nothing to download
    files = _remote_files(ref)
    paths = [_pull_file(ref, f, progress, force) for f in files]
    return paths[0]


def _pull_file(ref: HubRef, remote: RemoteFile, progress: store.Progress | None, force: bool) -> Path:
    name = ref.name_of(remote.path)
    if not remote.sha256 or remote.size is None:
        raise DownloadError(f"the hub publishes no SHA-256 and size for {name} (not an LFS file): it cannot be checked")
    target = target_path(ref, remote.path)
    if not is_repo_file(remote.path) or not target.resolve().is_relative_to(found.hub_store().resolve()):
        raise DownloadError(f"{name}: {remote.path!r} is not a file inside the repository: refused")
    if not force and target.is_file() and store.stamped_sha256(target) == remote.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with store._pull_lock("hf-" + hashlib.sha256(str(target).encode("utf-8")).hexdigest()[:16]):
        if not force and target.is_file() and store.stamped_sha256(target) == remote.sha256:
            return target  # another process pulled it while this one waited
        # The part file is named by the SHA-256 it must reach: a part of another version is never resumed.
        part = target.with_name(f".{target.name}.{remote.sha256[:16]}.part")
        for leftover in target.parent.glob(f".{target.name}.*.part"):
            if leftover != part or force:
                leftover.unlink(missing_ok=True)
        url = f"{endpoint()}/{ref.repo_id}/resolve/{_quote(ref.revision)}/{_quote(remote.path)}"
        _download(url, part, remote.size, remote.sha256, name, progress)
        store._stamp(target, remote.sha256, stat_of=part)
        os.replace(part, target)
    return target


def _download(url: str, part: Path, size: int, sha256: str, label: str, progress: store.Progress | None) -> None:
    """Fill ``part`` up to the published size (resuming what is there), then check its SHA-256."""
    digest = hashlib.sha256()
    have = part.stat().st_size if part.is_file() else 0
    if have > size:
        part.unlink()
        have = 0
    with open(part, "a+b") as out:
        out.seek(0)
        for block in iter(lambda: out.read(CHUNK), b""):  # what an earlier pull got: hashed again, not fetched
            digest.update(block)
        out.seek(0, os.SEEK_END)
        done = have
        if have < size:
            req = _request(url, headers={"Range": f"bytes={have}-"} if have else None)
            try:
                with _open(req) as resp:
                    if have and resp.status != 206:  # the server ignored the range: start again
                        out.truncate(0)
                        digest, done = hashlib.sha256(), 0
                    elif have and not re.match(rf"bytes {have}-", resp.headers.get("Content-Range", "")):
                        raise DownloadError(
                            f"{label}: the server answered a resume from byte {have} with another range"
                        )
                    if progress:
                        progress(done, size, label)
                    for block in iter(lambda: resp.read(CHUNK), b""):
                        if done + len(block) > size:
                            out.truncate(0)
                            raise DownloadError(f"{label}: the server sent more than the published {size} bytes")
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if progress:
                            progress(done, size, label)
            except (OSError, http.client.HTTPException) as exc:
                stopped = f"pulling {label} stopped after {done} of {size} bytes; run the same pull again to resume"
                raise _http_error(stopped, exc) from exc
            finally:
                out.flush()
                os.fsync(out.fileno())
    if done < size:
        raise DownloadError(
            f"pulling {label} stopped after {done} of {size} bytes (the connection closed); run the same pull again "
            "to resume"
        )
    got = digest.hexdigest()
    if got != sha256:
        part.unlink(missing_ok=True)  # resuming it could only fail again
        raise DownloadError(
            f"SHA-256 mismatch for {label}: the hub publishes {sha256}, the download has {got}; it was deleted"
        )


def remove(name: str) -> bool:
    """Delete a pulled ``hf:`` file (every part, stamp and leftover) from the store; False if it was not there."""
    ref = parse(name)
    if ref.file is None:
        raise ModelError(f"name the file to remove: hf:{ref.repo_id}/FILE.gguf (see: metaeol models list)")
    removed = False
    for path in split_paths(target_path(ref, ref.file)):
        if path.is_file():
            path.unlink()
            removed = True
        store._stamp_path(path).unlink(missing_ok=True)
        for leftover in path.parent.glob(f".{path.name}.*.part"):
            leftover.unlink(missing_ok=True)
    folder = target_path(ref, ref.file).parent
    while folder != found.hub_store() and folder.is_relative_to(found.hub_store()):
        try:
            folder.rmdir()
        except OSError:
            break
        folder = folder.parent
    return removed
