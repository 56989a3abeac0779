"""Where a run's model, tokenizer and data come from: a spec name, a local path or a hub id, resolved
to local files before anything reads them.

A hub id ("org/name") is fetched into the Hugging Face cache (``HF_HOME``, or ``HF_HUB_CACHE`` for
the hub part) once per node: the process with local rank 0 downloads, the node's other ranks wait for
its word and then only read the cache. Without that, every rank of a node downloads the same files at
once, and compute nodes without internet fail. With ``HF_HUB_OFFLINE=1`` (the Slurm templates' default,
after ``python -m wpn_dist.prepare`` on the login node) nothing is downloaded, and a file missing from
the cache is one error line naming it.

The word between the ranks is a small file in the node's temporary directory, so it needs no process
group: downloads happen before the group is joined, like every other read of the inputs.
"""
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass

from . import distributed
from .model_specs import MODEL_SPECS

# "org/name" (also "name" alone is a valid hub id, but it collides with spec names and typos: an
# organisation is required, as it is for every model this package targets).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Weights in formats the trainer never reads; a repository often holds several.
NOT_NEEDED = ["*.h5", "*.msgpack", "*.ot", "*.tflite", "*.onnx", "onnx/*", "flax_model*", "tf_model*",
              "coreml/*", "*.gguf", "*.mlmodel"]
TOKENIZER_FILES = ["tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "*.model", "config.json"]
WAIT_TIMEOUT_S = float(os.environ.get("WPN_DIST_FETCH_TIMEOUT_S", 6 * 3600))  # a 66B download is hours


class FetchError(OSError):
    """A source that cannot be had: the message names it and says what to do."""


def is_hub_id(name: str | None) -> bool:
    return bool(name) and bool(HUB_ID.match(name)) and not os.path.exists(name)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "0")).lower() in ("1", "true", "yes", "on")


def default_extensions_dir() -> None:
    """TORCH_EXTENSIONS_DIR, when unset, under HF_HOME: where prepare builds the DeepSpeed ops, so that
    a run started with the same HF_HOME finds them instead of compiling them again on every rank."""
    if os.environ.get("HF_HOME") and not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(os.environ["HF_HOME"], "torch_extensions")


def hub_cache() -> str:
    """The hub cache directory, as huggingface_hub finds it (read here, not at import, so that a
    command can set HF_HOME first)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                     "huggingface")
    return os.path.join(home, "hub")


@dataclass(frozen=True)
class Fetch:
    """One hub repository (or part of it) to have in the cache."""
    repo_id: str
    repo_type: str = "model"     # "model" or "dataset"
    what: str = "model"          # "model", "config", "tokenizer" or "data": which files, and for messages
    revision: str | None = None

    def patterns(self) -> dict:
        if self.what == "config":
            return {"allow_patterns": ["config.json"]}
        if self.what == "tokenizer":
            return {"allow_patterns": TOKENIZER_FILES}
        if self.what == "model":
            return {"ignore_patterns": NOT_NEEDED}
        return {}


def _download(job: Fetch, local_only: bool) -> str:
    """The snapshot directory of ``job`` in the cache, downloading what is missing unless ``local_only``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    patterns = job.patterns()
    if job.what == "model" and not local_only:
        patterns["ignore_patterns"] = patterns["ignore_patterns"] + _redundant_weights(job)
    try:
        return snapshot_download(job.repo_id, repo_type=job.repo_type, revision=job.revision, cache_dir=hub_cache(),
                                 local_files_only=local_only, **patterns)
    except LocalEntryNotFoundError:
        raise FetchError(f"{job.what} {job.repo_id}: not in the Hugging Face cache {hub_cache()}"
                         + (" and HF_HUB_OFFLINE=1" if offline() else "")
                         + f"; fetch it on a machine with internet: python -m wpn_dist.prepare "
                           f"--{'data' if job.repo_type == 'dataset' else 'model'} {job.repo_id} "
                           f"--cache_dir {os.path.dirname(hub_cache())}") from None
    except Exception as e:  # network, authentication, no such repository
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FetchError(f"{job.what} {job.repo_id}: cannot download ({type(e).__name__}: {first})") from None


def _redundant_weights(job: Fetch) -> list:
    """PyTorch .bin weights when the repository also has safetensors (many hold both: twice the
    download for nothing)."""
    from huggingface_hub import HfApi
    try:
        files = HfApi().list_repo_files(job.repo_id, repo_type=job.repo_type, revision=job.revision)
    except Exception:
        return []  # the download itself will say what is wrong
    return ["*.bin", "*.pt"] if any(f.endswith(".safetensors") for f in files) else []


def _launch_token() -> str:
    """Names this launch on this node, the same for its ranks and different for the next launch: the
    launcher's variables and the parent process, which started every local rank (the deepspeed
    launcher, torchrun's agent, Slurm's step daemon). Without the parent, two launches with the
    launcher's default port would share a name, and a rank could read the previous launch's word."""
    parts = [os.environ.get(k, "") for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT",
                                             "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts + [str(os.getppid())]))


def _ranks_on_node() -> int:
    local = distributed.launcher_local_world_size()
    return local if local is not None else distributed.env_world_size()  # unknown: the others may be here


def fetch_all(jobs: list, word_dir: str | None = None) -> dict:
    """Fetch -> local snapshot directory, for every job. Local rank 0 downloads (or, offline, only
    looks); the other ranks of its node wait for its word, then read the cache without the network.
    Raises FetchError with one line (on every rank, the same line)."""
    if not jobs:
        return {}
    word = os.path.join(word_dir or tempfile.gettempdir(), f"wpn_dist-fetch-{_launch_token()}.json")
    what = sorted(f"{job.repo_type}:{job.repo_id}:{job.what}:{job.revision}" for job in jobs)
    if distributed.env_local_rank() == 0:
        try:
            paths = {job: _download(job, local_only=offline()) for job in jobs}
        except FetchError as e:
            _say(word, {"jobs": what, "error": str(e)})
            raise
        _say(word, {"jobs": what, "ok": True})
        return paths
    if _ranks_on_node() > 1:
        said = _wait_for(word, what)
        if "error" in said:
            raise FetchError(said["error"])
    return {job: _download(job, local_only=True) for job in jobs}


def _say(path: str, message: dict) -> None:
    if _ranks_on_node() <= 1:
        return  # nobody waits
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(message, f)
    os.replace(tmp, path)  # atomic: a waiting rank never reads half a message


def _wait_for(path: str, what: list) -> dict:
    """Local rank 0's word about exactly these fetches (a word about others is an older launch's)."""
    started = time.time()
    while True:
        try:
            with open(path) as f:
                said = json.load(f)
            if said.get("jobs") == what:
                return said
        except (OSError, ValueError):
            pass
        if time.time() - started > WAIT_TIMEOUT_S:
            raise FetchError(f"local rank 0 did not finish fetching the model and data in {WAIT_TIMEOUT_S:.0f}s "
                             f"(WPN_DIST_FETCH_TIMEOUT_S); no word in {path}")
        time.sleep(0.5)


# --- a run's sources --------------------------------------------------------------------------------

@dataclass
class Sources:
    """The local places a run reads: a model directory (or a spec name / "toy" that needs no files), a
    tokenizer directory or None (the model's), and the data (a file, a directory, or "toy")."""
    model: str
    tokenizer: str | None
    data: str


def model_fetch(name: str, init: str = "pretrained") -> Fetch | None:
    """What ``--model name`` needs from the hub: the whole model for pretrained weights, its config
    for random init, or nothing (a local directory, a spec without a hub id, the toy model)."""
    if name in MODEL_SPECS:
        hub_id = MODEL_SPECS[name].hub_id
        if hub_id is None:
            return None
        return Fetch(hub_id, what="model") if init == "pretrained" else None  # random init: the spec has it all
    if is_hub_id(name):
        return Fetch(name, what="model" if init == "pretrained" else "config")
    return None


def tokenizer_fetch(model: str, tokenizer: str | None) -> Fetch | None:
    """The tokenizer's files, when they do not come with the model's fetch."""
    if tokenizer is not None:
        return Fetch(tokenizer, what="tokenizer") if is_hub_id(tokenizer) else None
    if model in MODEL_SPECS and MODEL_SPECS[model].hub_id is not None:
        return Fetch(MODEL_SPECS[model].hub_id, what="tokenizer")  # random init of a hub architecture
    if is_hub_id(model):
        return Fetch(model, what="tokenizer")
    return None


def data_fetch(data: str, data_format: str) -> Fetch | None:
    """A hub dataset ("org/name", no such local path) for PKU-SafeRLHF data. A name with a data file's
    extension is a file path (the reader says if it is missing), never a hub id."""
    if data == "toy" or not is_hub_id(data) or data.endswith((".json", ".jsonl", ".parquet", ".csv")):
        return None
    if data_format not in ("pku", "auto"):
        return None  # a JSONL path that does not exist: the reader says so
    return Fetch(data, repo_type="dataset", what="data")


def resolve(model: str, init: str, tokenizer: str | None, data: str = "toy", data_format: str = "auto",
            word_dir: str | None = None) -> Sources:
    """Fetch what the run needs (once per node) and return where it is on disk."""
    model_job, tokenizer_job, data_job = model_fetch(model, init), tokenizer_fetch(model, tokenizer), data_fetch(data, data_format)
    if model_job is not None and model_job.what == "model" and tokenizer_job is not None \
            and tokenizer_job.repo_id == model_job.repo_id:
        tokenizer_job = model_job  # a whole-model fetch holds the tokenizer's files
    jobs = [job for job in (model_job, tokenizer_job, data_job) if job is not None]
    paths = fetch_all(list(dict.fromkeys(jobs)), word_dir)
    if model_job is not None and model_job.what == "model":
        check_model_files(paths[model_job], model_job.repo_id)
    return Sources(model=paths[model_job] if model_job else model,
                   tokenizer=paths[tokenizer_job] if tokenizer_job else tokenizer,
                   data=paths[data_job] if data_job else data)


def check_model_files(directory: str, name: str) -> None:
    """One line naming the first missing file of a model directory: config.json, any weights, and every
    shard a weights index lists (a download cut short leaves exactly these gaps)."""
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FetchError(f"model {name}: {os.path.join(directory, 'config.json')} is missing")
    names = os.listdir(directory)
    indexes = [n for n in names if n.endswith(".index.json")]
    for index in indexes:
        with open(os.path.join(directory, index)) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        for shard in shards:
            if not os.path.isfile(os.path.join(directory, shard)):
                raise FetchError(f"model {name}: weight file {os.path.join(directory, shard)} is missing "
                                 f"(listed in {index})")
    if not indexes and not any(n.endswith((".safetensors", ".bin")) for n in names):
        raise FetchError(f"model {name}: no weights (*.safetensors or *.bin) in {directory}")
