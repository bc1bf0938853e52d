"""Training steps: placement-independence (jit, devices, pmap, processes), accumulation, frozen
teacher, one compile per shape, teacher-logit cache, bf16, and a PyTorch reference update."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from jaxkd import sharding, steps
from jaxkd.losses import LossConfig
from jaxkd.model import init_params
from jaxkd.optim import make_optimizer, make_schedule

TOL = 1e-5


# The tests take `world` for a label per row (sequence head), a label per token (token head) and
# start/end positions per row (span head). The sequence case of each is fast; the token and span
# cases build and compile everything again on other label shapes, so they are slow (still run in
# CI). The token and span objectives themselves are checked fast against NumPy in
# tests/tasks/test_qa.py and test_losses.py, their heads' PyTorch parity in tests/families.
KINDS = ["sequence", "token", "span"]
each_head = pytest.mark.parametrize("world", KINDS, indirect=True)
sequence_fast = pytest.mark.parametrize(
    "world", ["sequence", *(pytest.param(kind, marks=pytest.mark.slow) for kind in KINDS[1:])],
    indirect=True)


@pytest.fixture(scope="module")
def world(request):
    """The distillation world (helpers.build_world) of the head kind `request.param`."""
    kind = request.param
    student_cfg, teacher_cfg, loss_cfg, optim_cfg, state, teacher_params, batches = helpers.build_world(kind)
    step_fn = steps.make_distill_step(student_cfg, teacher_cfg, loss_cfg)
    mesh = sharding.make_mesh()
    return dict(kind=kind, student=student_cfg, teacher=teacher_cfg, loss=loss_cfg, optim=optim_cfg,
                state=state, teacher_params=teacher_params, batches=batches, step_fn=step_fn,
                jit_step=jax.jit(step_fn), mesh=mesh,
                # Jitted once per module: eager, a forward dispatches hundreds of small ops.
                student_logits=jax.jit(steps.make_logits_fn(student_cfg)),
                teacher_logits=jax.jit(steps.make_logits_fn(teacher_cfg)),
                mesh_step=helpers.compile_mesh_step(step_fn, mesh, state, teacher_params))


@pytest.fixture(scope="module")
def four_device_run(world):
    """Reference: STEPS jitted steps on a 4-device mesh, batch sharded over the rows."""
    return helpers.run_mesh_steps(world["mesh_step"], world["mesh"], world["state"],
                                world["teacher_params"], world["batches"])


def assert_close(a, b, tol=TOL):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                         rtol=tol, atol=tol), a, b)


def run_steps(step, state, teacher_params, batches):
    losses = []
    for k, batch in enumerate(batches):
        state, metrics = step(state, teacher_params, batch, jax.random.key(100 + k))
        losses.append(metrics["loss/total"])
    return state, losses


@pytest.mark.slow  # the eager step dispatches thousands of small ops
@sequence_fast
def test_jit_equals_eager(world):
    batch = world["batches"][0]
    args = (world["state"], world["teacher_params"], batch, jax.random.key(0))
    jit_state, jit_metrics = world["jit_step"](*args)
    with jax.disable_jit():
        eager_state, eager_metrics = world["step_fn"](*args)
    assert_close(jit_metrics, eager_metrics)
    assert_close(jit_state.params, eager_state.params)


@sequence_fast
def test_one_device_equals_four(world, four_device_run):
    mesh = sharding.make_mesh(jax.devices()[:1])
    step = helpers.compile_mesh_step(world["step_fn"], mesh, world["state"], world["teacher_params"])
    one_state, one_history = helpers.run_mesh_steps(step, mesh, world["state"],
                                                  world["teacher_params"], world["batches"])
    four_state, four_history = four_device_run
    assert len(four_state.params["encoder"]["embeddings"]["word_embeddings"]["embedding"].devices()) == 4
    assert_close([m["loss/total"] for m in one_history], [m["loss/total"] for m in four_history])
    assert_close(one_state.params, four_state.params)
    assert_close(one_state.proj_params, four_state.proj_params)
    assert int(four_state.step) == helpers.STEPS


def _with_transfer_rows(batch: dict, rng: np.random.Generator) -> dict:
    """The batch with hard_weights: 0 on transfer rows, which crowd the first device's quarter
    (all but one of its rows) and are scattered over the rest."""
    hard = batch["weights"].copy()
    quarter = len(hard) // 4
    hard[1:quarter] = 0.0
    hard[quarter + rng.choice(len(hard) - quarter, size=3, replace=False)] = 0.0
    return {**batch, "hard_weights": hard}


# Left out of the pmap comparison: the optimiser's readings, not the step's losses and metrics.
_NOT_PER_STEP = ("grad_norm", "learning_rate")


# The labelled case is slow: the transfer case has padding rows too and transfer rows besides.
@pytest.mark.parametrize("transfer", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["labelled", "transfer_rows"])
@sequence_fast
def test_pmap_equals_mesh_jit(world, transfer):
    # Full attention masks: token-averaged terms are then exact under per-device weighting too;
    # the padding rows (weight 0) still fall unevenly on the devices, and so do transfer rows
    # (hard-label weight 0), whose hard term and accuracy are means over the labelled rows.
    rng = np.random.default_rng(1)
    batches = [helpers.random_batch(rng, full_mask=True, kind=world["kind"]) for _ in range(helpers.STEPS)]
    if transfer:
        batches = [_with_transfer_rows(b, rng) for b in batches]
    mesh_state, mesh_history = helpers.run_mesh_steps(
        world["mesh_step"], world["mesh"], world["state"], world["teacher_params"], batches)

    pstep = jax.pmap(steps.make_distill_step(world["student"], world["teacher"], world["loss"],
                                             axis_name="data"), axis_name="data")
    stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * 4), tree)  # noqa: E731
    split = lambda b: {k: v.reshape(4, -1, *v.shape[1:]) for k, v in b.items()}  # noqa: E731
    state, teacher_params = stack(world["state"]), stack(world["teacher_params"])
    for k, (batch, expected) in enumerate(zip(batches, mesh_history)):
        keys = jnp.stack([jax.random.key(100 + k)] * 4)
        state, metrics = pstep(state, teacher_params, split(batch), keys)
        compared = [name for name in expected if name not in _NOT_PER_STEP]
        assert_close({name: metrics[name][0] for name in compared},
                     {name: expected[name] for name in compared})
    assert_close(jax.tree.map(lambda x: x[0], state.params), mesh_state.params)


@pytest.mark.slow
@each_head
def test_two_processes_equal_one(world, four_device_run, tmp_path):
    result = helpers.two_process_result(world["kind"], tmp_path)
    state, history = four_device_run
    assert_close(result["losses"], [m["loss/total"] for m in history])
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        np.testing.assert_allclose(result[jax.tree_util.keystr(path)], leaf, rtol=TOL, atol=TOL)


@pytest.mark.slow
@sequence_fast
def test_accumulation_equals_union_batch(world):
    k, updates = 2, 3
    rng = np.random.default_rng(2)
    # MultiSteps averages micro-batch means: equal to the union's mean for equal weight (and,
    # for the token-averaged terms, token) counts per micro-batch.
    micro = [helpers.random_batch(rng, rows=4, full_mask=True, kind=world["kind"])
             for _ in range(k * updates)]
    for b in micro:
        b["weights"][:] = 1.0
    union = [{key: np.concatenate([b[key] for b in micro[u * k:(u + 1) * k]]) for key in micro[0]}
             for u in range(updates)]
    optim = dataclasses.replace(world["optim"], accumulate_steps=k)
    schedule = make_schedule(optim, total_steps=10)
    step_fn = steps.make_distill_step(world["student"], world["teacher"], world["loss"], schedule)
    step = jax.jit(step_fn)

    acc_state = steps.TrainState.create(world["state"].params, make_optimizer(optim, 10),
                                        world["state"].proj_params)
    acc_state, _ = run_steps(step, acc_state, world["teacher_params"], micro[:-1])
    assert int(acc_state.step) == updates - 1  # counts updates, not micro-batches
    acc_state, metrics = step(acc_state, world["teacher_params"], micro[-1], jax.random.key(0))
    np.testing.assert_allclose(metrics["learning_rate"], schedule(updates - 1))
    full_state, _ = run_steps(step, world["state"], world["teacher_params"], union)
    assert int(acc_state.step) == int(full_state.step) == updates
    assert_close(acc_state.params, full_state.params)
    assert_close(acc_state.proj_params, full_state.proj_params)


@sequence_fast
def test_teacher_is_frozen(world, four_device_run):
    teacher_params = world["teacher_params"]
    run_steps(world["jit_step"], world["state"], teacher_params, world["batches"])
    # The step may not consume the teacher's buffers (donation is for the student's state).
    assert not any(x.is_deleted() for x in jax.tree.leaves(teacher_params))
    # The optimizer sees the student and the projections, nothing else.
    trainable = {"params": world["state"].params, "proj_params": world["state"].proj_params}
    mu = optax.tree.get(world["state"].opt_state, "mu")
    assert jax.tree.structure(mu) == jax.tree.structure(trainable)

    def loss_of_teacher(tp):
        return world["step_fn"](world["state"], tp, world["batches"][0],
                                jax.random.key(0))[1]["loss/total"]

    grads = jax.jit(jax.grad(loss_of_teacher))(teacher_params)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


def _with_cache(world, batch):
    logits = world["teacher_logits"](world["teacher_params"], batch)
    return {**batch, "teacher_logits": np.asarray(logits)}


@sequence_fast
def test_teacher_logit_cache_equals_in_step_teacher(world):
    loss_cfg = LossConfig(temperature=3.0, alpha=0.7)
    live = jax.jit(steps.make_distill_step(world["student"], world["teacher"], loss_cfg,
                                           teacher="live"))
    cached_step = jax.jit(steps.make_distill_step(world["student"], world["teacher"], loss_cfg,
                                                  teacher="cached"))
    cached = [_with_cache(world, b) for b in world["batches"]]
    in_step_state, in_step_losses = run_steps(live, world["state"], world["teacher_params"],
                                              world["batches"])
    # Garbage teacher params: with cached logits the teacher must not run at all.
    garbage = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), world["teacher_params"])
    cached_state, cached_losses = run_steps(cached_step, world["state"], garbage, cached)
    assert_close(cached_losses, in_step_losses)
    assert_close(cached_state.params, in_step_state.params)


@pytest.mark.slow
@sequence_fast
def test_compiles_once_per_batch_shape(world):
    mesh = sharding.make_mesh()
    state_shardings = sharding.tree_shardings(mesh, world["state"])
    step = sharding.jit_finetune_step(steps.make_finetune_step(world["student"]), mesh,
                                      state_shardings)
    state, rng = sharding.shard_state(world["state"], mesh), np.random.default_rng(3)
    lengths = [8, 16, 8, 8, 16, 8]
    for length in lengths:
        batch = sharding.global_batch(helpers.random_batch(rng, length=length, kind=world["kind"]), mesh)
        state, _ = step(state, batch, jax.random.key(0))
    assert step._cache_size() == len(set(lengths))
    # Donation freed the placed copies, never the caller's arrays.
    assert not any(x.is_deleted() for x in jax.tree.leaves(world["state"].params))


@sequence_fast
def test_bf16_compute_keeps_fp32_params_and_losses(world):
    student, teacher = world["student"].replace(dtype="bfloat16"), world["teacher"].replace(dtype="bfloat16")
    step = jax.jit(steps.make_distill_step(student, teacher, world["loss"]))
    state, metrics = step(world["state"], world["teacher_params"], world["batches"][0],
                          jax.random.key(0))
    assert {m.dtype for m in metrics.values()} == {jnp.dtype(jnp.float32)}
    assert all(np.isfinite(m) for m in metrics.values())
    assert {x.dtype for x in jax.tree.leaves((state.params, state.proj_params))} == {jnp.dtype(jnp.float32)}
    mu = optax.tree.get(state.opt_state, "mu")
    assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.float32)}


@sequence_fast
def test_distill_metrics_match_numpy(world):
    batch = world["batches"][0]
    _, metrics = world["jit_step"](world["state"], world["teacher_params"], batch, jax.random.key(0))
    s_logits = np.asarray(world["student_logits"](world["state"].params, batch))
    t_logits = np.asarray(world["teacher_logits"](world["teacher_params"], batch))
    labels, T = batch["labels"], world["loss"].temperature
    if world["kind"] == "span":  # start and end: distributions over each row's real tokens
        mask = batch["attention_mask"][:, None, :] > 0
        s_logits = np.where(mask, s_logits.transpose(0, 2, 1), -1e9)
        t_logits = np.where(mask, t_logits.transpose(0, 2, 1), -1e9)
        w = np.broadcast_to(batch["weights"][:, None], labels.shape)
    else:
        # Each row (sequence) or each labelled token (token head) counts with its row's weight.
        w = batch["weights"] if labels.ndim == 1 else batch["weights"][:, None] * (labels >= 0)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    t_logp, s_logp = log_softmax(t_logits / T), log_softmax(s_logits / T)
    kd = (np.exp(t_logp) * (t_logp - s_logp)).sum(-1)
    ce = -np.take_along_axis(log_softmax(s_logits), np.maximum(labels, 0)[..., None], -1)[..., 0]
    mean = lambda v: (w * v).sum() / w.sum()  # noqa: E731
    np.testing.assert_allclose(metrics["loss/kd"], mean(kd) * T**2, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["loss/ce"], mean(ce), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], mean(s_logits.argmax(-1) == labels), rtol=1e-6)
    np.testing.assert_allclose(metrics["agreement"], mean(s_logits.argmax(-1) == t_logits.argmax(-1)),
                               rtol=1e-6)


@sequence_fast
def test_finetune_step_matches_torch_sgd(world):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxkd.hf import config_to_hf, hf_state_dict
    cfg, lr = world["student"], 0.1
    params, batch = world["state"].params, world["batches"][0]
    state = steps.TrainState.create(params, optax.sgd(lr))
    new_state, metrics = jax.jit(steps.make_finetune_step(cfg))(state, batch, jax.random.key(0))

    token, span = world["kind"] == "token", world["kind"] == "span"
    cls = {"token": transformers.BertForTokenClassification,
           "span": transformers.BertForQuestionAnswering}.get(world["kind"],
                                                             transformers.BertForSequenceClassification)
    model = cls(transformers.BertConfig(**config_to_hf(cfg)))
    model.load_state_dict({k: torch.tensor(v) for k, v in hf_state_dict(cfg, params).items()},
                          strict=False)
    out = model(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
                token_type_ids=torch.from_numpy(batch["token_type_ids"]).long())
    logits = torch.stack([out.start_logits, out.end_logits], 1) if span else out.logits
    w, labels = torch.from_numpy(batch["weights"]), torch.from_numpy(batch["labels"]).long()
    if span:  # start and end over each row's real tokens (padding masked), averaged
        logits = logits.masked_fill(torch.from_numpy(batch["attention_mask"])[:, None, :] == 0, -1e9)
        per_pos = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        loss = (w * per_pos.mean(1)).sum() / w.sum()
    elif token:  # PyTorch's own masking: ignore_index -100 on unlabelled tokens, then the row weight
        labels = torch.where(labels >= 0, labels, -100)
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels,
                                                      ignore_index=-100, reduction="none")
        w = w[:, None] * (labels >= 0)
        loss = (w * per_token).sum() / w.sum()
    else:
        per_row = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        loss = (w * per_row).sum() / w.sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    np.testing.assert_allclose(metrics["loss/ce"], loss.item(), rtol=1e-5)
    grad_norm = torch.sqrt(sum((g**2).sum() for g in grads.values())).item()
    np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-4)
    updated = hf_state_dict(cfg, new_state.params)
    for name, p in model.named_parameters():
        expected = (p - lr * p.grad).detach().numpy() if p.grad is not None else p.detach().numpy()
        np.testing.assert_allclose(updated[name], expected, rtol=1e-4, atol=1e-6, err_msg=name)


@sequence_fast
def test_logits_fn_shapes(world):
    batch = world["batches"][0]
    logits = world["student_logits"](world["state"].params, batch)
    shape = {"sequence": (helpers.BATCH, 3), "token": (helpers.BATCH, helpers.LENGTH, 3),
             "span": (helpers.BATCH, helpers.LENGTH, 2)}[world["kind"]]
    assert logits.dtype == jnp.float32 and logits.shape == shape


@pytest.mark.parametrize("world", ["sequence"], indirect=True)  # a sequence head with one output
def test_regression_head_trains_on_squared_error(world):
    cfg = world["student"].replace(num_labels=1)
    batch = {**world["batches"][0], "labels": np.linspace(-1, 1, helpers.BATCH).astype(np.float32)}
    state = steps.TrainState.create(init_params(cfg, jax.random.key(0)), optax.sgd(0.0))
    _, metrics = jax.jit(steps.make_finetune_step(cfg))(state, batch, jax.random.key(0))
    pred = np.asarray(jax.jit(steps.make_logits_fn(cfg))(state.params, batch))[:, 0]
    w = batch["weights"]
    np.testing.assert_allclose(metrics["loss/mse"], (w * (pred - batch["labels"]) ** 2).sum() / w.sum(),
                               rtol=1e-5)


@sequence_fast
def test_bad_inputs_are_named(world):
    batch = {k: v for k, v in world["batches"][0].items() if k != "weights"}
    with pytest.raises(KeyError, match="weights"):
        world["step_fn"](world["state"], world["teacher_params"], batch, jax.random.key(0))
    with pytest.raises(ValueError, match="head"):
        other = "token" if world["kind"] != "token" else "sequence"
        steps.make_distill_step(world["student"], world["teacher"].replace(kind=other, num_labels=2),
                                world["loss"])
    with pytest.raises(ValueError, match="must be 'live'"):
        steps.make_distill_step(world["student"], world["teacher"], world["loss"], teacher="cached")
    with pytest.raises(ValueError, match="needs the teacher's logits"):
        steps.make_distill_step(world["student"], world["teacher"], LossConfig(alpha=0.5),
                                teacher="none")
    cached = jax.jit(steps.make_distill_step(world["student"], world["teacher"], LossConfig(),
                                             teacher="cached"))
    with pytest.raises(KeyError, match="teacher_logits"):
        cached(world["state"], None, world["batches"][0], jax.random.key(0))


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it."""
    from jax.extend import core
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, core.Jaxpr):
                    yield from _eqns(sub)


@sequence_fast
def test_bf16_step_casts_each_kernel_once_and_accumulates_in_fp32(world):
    """Under bf16 the encoders' matmuls take bf16 operands into fp32 results, forward and
    backward; each fp32 kernel is cast once per step and no weight gradient is rounded to bf16."""
    student, teacher = world["student"].replace(dtype="bfloat16"), world["teacher"].replace(dtype="bfloat16")
    step = steps.make_distill_step(student, teacher, world["loss"])
    jaxpr = jax.make_jaxpr(step)(world["state"], world["teacher_params"], world["batches"][0],
                                 jax.random.key(0)).jaxpr
    eqns = list(_eqns(jaxpr))
    converts = [(e.invars[0].aval, e.params["new_dtype"]) for e in eqns
                if e.primitive.name == "convert_element_type"]
    kernels = lambda params: sum(  # noqa: E731
        1 for path, _ in jax.tree_util.tree_leaves_with_path(params["encoder"])
        if path[-1].key == "kernel")
    n_kernels = kernels(world["state"].params) + kernels(world["teacher_params"])
    # Kernels are the only 2-D fp32 arrays cast to bf16 (activations are 3-D and 4-D).
    assert sum(1 for aval, new in converts
               if aval.ndim == 2 and aval.dtype == jnp.float32 and new == jnp.bfloat16) == n_kernels
    assert not [aval for aval, new in converts if aval.ndim == 2 and aval.dtype == jnp.bfloat16]
    dots = [(e.invars[0].aval.dtype, e.invars[1].aval.dtype, e.params["preferred_element_type"])
            for e in eqns if e.primitive.name == "dot_general"]
    bf16 = jnp.dtype(jnp.bfloat16)
    mixed = [d for d in dots if bf16 in d[:2]]
    assert all(d == (bf16, bf16, jnp.float32) for d in mixed), set(mixed)
    # Per layer: Q, K, V, output and two FFN projections, and the two attention products;
    # the student's run forward and twice backward (both operands' gradients).
    per_layer = 8
    assert len(mixed) == per_layer * (teacher.encoder.num_layers + 3 * student.encoder.num_layers)
