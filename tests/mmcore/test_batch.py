import numpy as np
import pytest
import torch

from mmcore import ModalityBatch, collate_modalities, require_modality_batch


def make_batch(b=4):
    return ModalityBatch(
        {
            "text": torch.randn(b, 6, 8),
            "audio": torch.randn(b, 5, 3),
            "vec": torch.randn(b, 7),
            "image": torch.randn(b, 1, 4, 4),
        },
        target=torch.arange(b).float(),
        padding_masks={"text": torch.zeros(b, 6, dtype=torch.bool)},
        sample_ids=[f"s{i}" for i in range(b)],
    )


def test_basic_accessors():
    batch = make_batch()
    assert batch.modalities == ("text", "audio", "vec", "image")
    assert batch.batch_size == len(batch) == 4
    assert [batch.kind(m) for m in batch.modalities] == [
        "sequence",
        "sequence",
        "vector",
        "spatial",
    ]
    assert batch.is_present("audio").all()
    assert batch.padding_mask("audio") is None
    assert batch.padding_mask("text").shape == (4, 6)
    assert "text" in batch and "video" not in batch
    assert batch.require_target() is batch.target
    with pytest.raises(ValueError, match="has no target"):
        batch.replace(target=None).require_target()


def test_token_ids_are_a_sequence_kind():
    batch = ModalityBatch(
        {"ids": torch.ones(2, 5, dtype=torch.long)},
        padding_masks={"ids": torch.tensor([[False] * 5, [False] * 3 + [True] * 2])},
    )
    assert batch.kind("ids") == "tokens"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"inputs": {}}, ValueError, "at least one modality"),
        ({"inputs": {"a": [1, 2]}}, TypeError, "modality 'a': expected a torch.Tensor"),
        ({"inputs": {"a": torch.zeros(3)}}, ValueError, r"modality 'a'.*found shape \(3,\)"),
        ({"inputs": {"a": torch.zeros(3, 2, dtype=torch.bool)}}, TypeError, "floating or integer"),
        (
            {"inputs": {"a": torch.zeros(3, 2), "b": torch.zeros(4, 5, 6)}},
            ValueError,
            r"modality 'b': expected batch size 3 \(as modality 'a'\), found shape \(4, 5, 6\)",
        ),
        (
            {
                "inputs": {"a": torch.zeros(3, 2)},
                "presence": {"a": torch.ones(4, dtype=torch.bool)},
            },
            ValueError,
            r"presence mask of modality 'a': expected shape \(3,\), found \(4,\)",
        ),
        (
            {"inputs": {"a": torch.zeros(3, 2)}, "presence": {"a": torch.ones(3)}},
            TypeError,
            "bool tensor",
        ),
        (
            {
                "inputs": {"a": torch.zeros(3, 2)},
                "presence": {"z": torch.ones(3, dtype=torch.bool)},
            },
            ValueError,
            "modality 'z', which is not in the batch",
        ),
        (
            {
                "inputs": {"a": torch.zeros(3, 5, 2)},
                "padding_masks": {"a": torch.zeros(3, 4, dtype=torch.bool)},
            },
            ValueError,
            r"padding mask of modality 'a': expected shape \(3, 5\), found \(3, 4\)",
        ),
        (
            {
                "inputs": {"a": torch.zeros(3, 2)},
                "padding_masks": {"a": torch.zeros(3, 2, dtype=torch.bool)},
            },
            ValueError,
            "padding masks apply only",
        ),
        (  # masks index the inputs: another device is an error here, not in a later kernel
            {
                "inputs": {"a": torch.zeros(3, 2)},
                "presence": {"a": torch.ones(3, dtype=torch.bool, device="meta")},
            },
            ValueError,
            r"presence mask of modality 'a' is on meta but the inputs are on cpu",
        ),
        (
            {
                "inputs": {"a": torch.zeros(3, 5, 2)},
                "padding_masks": {"a": torch.zeros(3, 5, dtype=torch.bool, device="meta")},
            },
            ValueError,
            r"padding mask of modality 'a' is on meta but the inputs are on cpu",
        ),
        (
            {"inputs": {"a": torch.zeros(3, 2)}, "target": torch.zeros(2)},
            ValueError,
            r"target: expected leading dimension 3, found shape \(2,\)",
        ),
        (
            {"inputs": {"a": torch.zeros(3, 2)}, "sample_ids": ["x"]},
            ValueError,
            "expected 3 ids, found 1",
        ),
        ({"inputs": {"": torch.zeros(3, 2)}}, TypeError, "non-empty strings, found ''"),
        (
            {"inputs": {"a": torch.zeros(3, 2), "b": torch.zeros(3, 2, device="meta")}},
            ValueError,
            r"modality 'b' is on meta but 'a' is on cpu; move the batch with \.to\(device\)",
        ),
        (
            {
                "inputs": {"a": torch.zeros(3, 5, 2)},
                "padding_masks": {"a": torch.zeros(3, 5)},
            },
            TypeError,
            r"padding mask of modality 'a': expected a bool tensor \(True = padding\)",
        ),
        (
            {"inputs": {"a": torch.zeros(3, 2)}, "target": [0, 1, 2]},
            TypeError,
            "target: expected a torch.Tensor, found <class 'list'>",
        ),
    ],
)
def test_bad_input_raises_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        ModalityBatch(**kwargs)


def test_unknown_modality_lookup_lists_modalities():
    with pytest.raises(KeyError, match=r"'video' is not in the batch .*'text'"):
        make_batch()["video"]
    # samples are selected, not indexed, and a batch is not iterated sample by sample
    with pytest.raises(TypeError, match=r"takes a modality name, got int.*batch.select"):
        make_batch()[0]
    with pytest.raises(TypeError, match=r"not iterable: loop over batch.modalities"):
        list(make_batch())


def test_with_missing_marks_and_zero_fills():
    batch = make_batch()
    missing = torch.tensor([True, False, True, False])
    out = batch.with_missing("audio", missing)
    assert out.is_present("audio").tolist() == [False, True, False, True]
    assert (out["audio"][missing] == 0).all()
    assert torch.equal(out["audio"][~missing], batch["audio"][~missing])
    # the original batch is untouched and missingness accumulates
    assert batch.is_present("audio").all()
    out2 = out.with_missing("audio", torch.tensor([False, True, False, False]), fill=None)
    assert out2.is_present("audio").tolist() == [False, False, False, True]
    assert torch.equal(out2["audio"][1], batch["audio"][1])
    with pytest.raises(ValueError, match=r"expected shape \(4,\), found \(3,\)"):
        batch.with_missing("audio", torch.zeros(3, dtype=torch.bool))
    # token ids take a whole-number fill (a padding id); 0.5 would be truncated to 0
    ids = ModalityBatch({"ids": torch.arange(8).view(2, 4), "v": torch.randn(2, 3)})
    assert ids.with_missing("ids", fill=1)["ids"].eq(1).all()
    with pytest.raises(ValueError, match=r"fill=0.5 cannot be written into modality 'ids'"):
        ids.with_missing("ids", fill=0.5)


def test_select_split_concat_round_trip():
    batch = make_batch(10).with_missing("vec", torch.arange(10) % 3 == 0)
    parts = list(batch.split(4))
    assert [len(p) for p in parts] == [4, 4, 2]
    back = ModalityBatch.concat(parts)
    for m in batch.modalities:
        assert torch.equal(back[m], batch[m])
    assert torch.equal(back.is_present("vec"), batch.is_present("vec"))
    assert back.sample_ids == batch.sample_ids
    sub = batch.select(torch.tensor([7, 2]))
    assert sub.sample_ids == ["s7", "s2"]
    assert torch.equal(sub.target, torch.tensor([7.0, 2.0]))
    shuffled = list(batch.split(3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert sorted(i for p in shuffled for i in p.sample_ids) == sorted(batch.sample_ids)
    assert [len(p) for p in batch.split(4, drop_last=True)] == [4, 4]
    assert [len(p) for p in batch.split(5, drop_last=True)] == [5, 5]  # a full last one stays
    assert [p.sample_ids for p in batch.split(1)] == [[i] for i in batch.sample_ids]
    by_slice, by_list = batch.select(slice(2, 5)), batch.select([2, 3, 4])
    assert by_slice.sample_ids == by_list.sample_ids == ["s2", "s3", "s4"]
    # a part without ids keeps the others' (they used to be dropped), None for its own
    unnamed = parts[1].replace(sample_ids=None)
    assert ModalityBatch.concat([parts[0], unnamed]).sample_ids == [
        *parts[0].sample_ids,
        *[None] * 4,
    ]
    assert ModalityBatch.concat([unnamed, unnamed]).sample_ids is None
    assert all(torch.equal(by_slice[m], by_list[m]) for m in batch.modalities)


@pytest.mark.parametrize(
    ("size", "error"), [([4, 6], TypeError), (2.5, TypeError), (0, ValueError)]
)
def test_split_checks_its_size_at_the_call(size, error):
    with pytest.raises(error, match=r"split|batch_size"):
        make_batch(10).split(size)  # not only once iterated


def test_require_modality_batch_says_how_to_make_one():
    batch = make_batch(2)
    assert require_modality_batch(batch, "f") is batch
    with pytest.raises(TypeError, match=r"f takes a ModalityBatch, got a dict; wrap it"):
        require_modality_batch(dict(batch.inputs), "f")
    with pytest.raises(TypeError, match=r"g takes a ModalityBatch, got a Tensor; build one"):
        require_modality_batch(torch.zeros(2), "g")


def test_to_casts_floating_inputs_only():
    batch = ModalityBatch(
        {"x": torch.randn(2, 3), "ids": torch.ones(2, 4, dtype=torch.long)},
        presence={"x": torch.tensor([True, False])},
    )
    out = batch.to("cpu", dtype=torch.float64)
    assert out["x"].dtype == torch.float64
    assert out["ids"].dtype == torch.long
    assert out.presence["x"].dtype == torch.bool
    # a dtype first, as Tensor.to takes it
    assert batch.to(torch.float64)["x"].dtype == torch.float64
    with pytest.raises(TypeError, match="two dtypes"):
        batch.to(torch.float64, torch.float16)


def test_pin_memory_pins_every_tensor(monkeypatch):
    """``DataLoader(pin_memory=True)`` calls ``pin_memory()`` on what it yields; without the
    method a batch was passed through unpinned. (Pinning needs an accelerator: stubbed here,
    the real one is in tests/cuda.)"""
    pinned = []

    def fake_pin(t):
        pinned.append(t)
        return t.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = ModalityBatch(
        {"x": torch.randn(2, 3, 4), "ids": torch.ones(2, 4, dtype=torch.long)},
        torch.zeros(2),
        padding_masks={"x": torch.tensor([[False] * 3, [False, False, True]])},
        sample_ids=["a", "b"],
    ).with_missing("ids", torch.tensor([True, False]))
    out = torch.utils.data._utils.pin_memory.pin_memory(batch)  # what the DataLoader calls
    assert isinstance(out, ModalityBatch) and out.sample_ids == ["a", "b"]
    assert len(pinned) == 5  # two inputs, the target, a padding mask, a presence mask
    for m in batch.modalities:
        assert torch.equal(out[m], batch[m]) and out[m] is not batch[m]
        assert torch.equal(out.is_present(m), batch.is_present(m))


def test_collate_pads_variable_length_sequences():
    samples = [
        {"inputs": {"a": torch.ones(3, 2), "v": torch.ones(5)}, "target": 1.0, "sample_id": 0},
        {
            "inputs": {"a": torch.ones(5, 2), "v": torch.ones(5)},
            "target": 2.0,
            "sample_id": 1,
            "presence": {"v": False},
        },
    ]
    batch = collate_modalities(samples)
    assert batch["a"].shape == (2, 5, 2)
    assert batch.padding_mask("a").tolist() == [[False] * 3 + [True] * 2, [False] * 5]
    assert batch["a"][0, 3:].abs().sum() == 0
    assert batch.is_present("v").tolist() == [True, False]
    assert batch.target.tolist() == [1.0, 2.0]
    # a sample's own padding (e.g. a tokenizer's) is kept, and the collate padding added to it
    samples[1]["padding_masks"] = {"a": [False, False, False, False, True]}
    batch = collate_modalities(samples)
    assert batch.padding_mask("a").tolist() == [[False] * 3 + [True] * 2, [False] * 4 + [True]]
    samples[1]["padding_masks"] = {"a": [False, True]}
    with pytest.raises(ValueError, match="sample 1's padding mask for 'a' has shape"):
        collate_modalities(samples)
    assert batch.sample_ids == [0, 1]


def test_collate_marks_a_modality_a_sample_lacks_as_missing():
    """Every modality any sample has is kept, whichever sample comes first: one a sample lacks
    (no key, or None) is zero-filled there and marked missing, as with_missing marks it."""
    g = torch.Generator().manual_seed(0)
    seq, vec = torch.randn(4, 2, generator=g), torch.randn(5, generator=g)
    full = {"inputs": {"a": torch.randn(3, 2, generator=g), "s": seq, "v": vec}, "target": 1}
    no_key = {"inputs": {"a": torch.randn(4, 2, generator=g)}, "target": 0}
    none = {"inputs": {"a": torch.randn(2, 2, generator=g), "s": None, "v": None}, "target": 2}
    batch = collate_modalities([no_key, full, none])
    assert batch.modalities == ("a", "s", "v")
    for m in ("s", "v"):
        assert batch.is_present(m).tolist() == [False, True, False]
        assert batch[m][0].abs().sum() == 0 and batch[m][2].abs().sum() == 0
    torch.testing.assert_close(batch["s"][1], seq)
    torch.testing.assert_close(batch["v"][1], vec)
    assert batch.padding_mask("s") is None  # the filler takes the length of the sample's with it
    explicit = [
        {
            **no_key,
            "inputs": {**no_key["inputs"], "s": torch.zeros(4, 2), "v": torch.zeros(5)},
            "presence": {"s": False, "v": False},
        },
        full,
        {
            **none,
            "inputs": {**none["inputs"], "s": torch.zeros(4, 2), "v": torch.zeros(5)},
            "presence": {"s": False, "v": False},
        },
    ]
    expected = collate_modalities(explicit)
    for m in batch.modalities:
        assert torch.equal(batch[m], expected[m])
        assert torch.equal(batch.is_present(m), expected.is_present(m))
    reordered = collate_modalities([full, no_key, none])
    assert reordered.modalities == ("a", "s", "v")
    with pytest.raises(ValueError, match="sample 0 marks modality 's' present but holds no"):
        collate_modalities([{**no_key, "presence": {"s": True}}, full])
    with pytest.raises(ValueError, match="no sample holds a tensor for modality 's'"):
        collate_modalities([none, none])


def test_concat_keeps_every_modality_and_marks_it_missing_where_a_batch_lacks_it():
    g = torch.Generator().manual_seed(0)
    both = ModalityBatch(
        {"a": torch.randn(2, 3, generator=g), "s": torch.randn(2, 4, 2, generator=g)},
        target=torch.tensor([0, 1]),
    ).with_missing("a", torch.tensor([False, True]))
    only_a = ModalityBatch({"a": torch.randn(3, 3, generator=g)}, target=torch.tensor([2, 3, 4]))
    out = ModalityBatch.concat([only_a, both])
    assert out.modalities == ("a", "s")
    assert out.is_present("s").tolist() == [False, False, False, True, True]
    assert out.is_present("a").tolist() == [True, True, True, True, False]
    assert out["s"][:3].abs().sum() == 0 and torch.equal(out["s"][3:], both["s"])
    assert ModalityBatch.concat([both, only_a]).modalities == ("a", "s")
    # one-sample batches from a Dataset: collated as the mapping samples are
    from_batches = collate_modalities([only_a.select([0]), both.select([0])])
    from_mappings = collate_modalities(
        [{"inputs": {"a": only_a["a"][0]}}, {"inputs": {"a": both["a"][0], "s": both["s"][0]}}]
    )
    for m in ("a", "s"):
        assert torch.equal(from_batches[m], from_mappings[m])
        assert torch.equal(from_batches.is_present(m), from_mappings.is_present(m))


def test_concat_pads_sequences_of_different_lengths():
    # a Dataset returning one-sample batches of their own lengths: collate pads them
    short = ModalityBatch(
        {"a": torch.ones(1, 3, 2), "ids": torch.ones(1, 2, dtype=torch.long), "v": torch.ones(1, 4)}
    )
    long = ModalityBatch(
        {
            "a": torch.ones(2, 5, 2),
            "ids": torch.ones(2, 2, dtype=torch.long),
            "v": torch.ones(2, 4),
        },
        padding_masks={"a": torch.tensor([[False] * 4 + [True], [False] * 5])},
    )
    batch = collate_modalities([short, long])
    assert batch["a"].shape == (3, 5, 2)
    assert batch["a"][0, 3:].abs().sum() == 0
    assert batch.padding_mask("a").tolist() == [
        [False] * 3 + [True] * 2,
        [False] * 4 + [True],
        [False] * 5,
    ]
    assert batch.padding_mask("ids") is None and batch.padding_mask("v") is None
    # equal lengths, no masks: plain concatenation
    same = ModalityBatch.concat([long, long])
    assert torch.equal(same.padding_mask("a"), torch.cat([long.padding_mask("a")] * 2))
    with pytest.raises(ValueError, match=r"modality 'a' has shape \(1, 3, 2\) in batch 0 and "):
        ModalityBatch.concat(
            [short, short.replace(inputs={**short.inputs, "a": torch.ones(1, 3, 4)})]
        )
    with pytest.raises(ValueError, match=r"modality 'v'.*shapes differ"):
        ModalityBatch.concat([short, short.replace(inputs={**short.inputs, "v": torch.ones(1, 5)})])


def test_collate_works_with_dataloader_and_rejects_bad_samples():
    data = [{"inputs": {"a": torch.full((2,), float(i))}, "target": i} for i in range(5)]
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collate_modalities)
    batches = list(loader)
    assert [len(b) for b in batches] == [2, 2, 1]
    # the (x, y) pair a dataset usually returns, as a tuple or a list
    pairs = [({"a": torch.full((2,), float(i))}, i) for i in range(3)]
    pairs[2] = list(pairs[2])
    batch = collate_modalities(pairs)
    assert batch.target.tolist() == [0, 1, 2] and batch["a"][:, 0].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(TypeError, match=r"sample 0 is tuple; .* an \(inputs, target\) pair"):
        collate_modalities([(torch.ones(2), 0)])
    # a scalar per sample (a Python number, a numpy scalar, a 0-d tensor) is one feature
    scalars = [{"inputs": {"age": a}} for a in (31.0, np.float32(40.5), torch.tensor(52.0))]
    assert collate_modalities(scalars)["age"].tolist() == [[31.0], [40.5], [52.0]]
    with pytest.raises(ValueError, match="only the time axis"):
        collate_modalities([{"inputs": {"a": torch.ones(2)}}, {"inputs": {"a": torch.ones(3)}}])
    with pytest.raises(ValueError, match=r"per-sample shapes \(3, 4\) and \(5, 6\); only the time"):
        collate_modalities(
            [{"inputs": {"a": torch.ones(3, 4)}}, {"inputs": {"a": torch.ones(5, 6)}}]
        )
    with pytest.raises(TypeError, match="sample 0 is Tensor"):
        collate_modalities([torch.ones(2)])
    flat = {"text": torch.ones(2), "target": torch.tensor(1.0)}  # modalities at the top level
    with pytest.raises(
        TypeError, match=r"keys \['target', 'text'\] but no 'inputs'.*\{'inputs': \{modality"
    ):
        collate_modalities([flat])
    one = ModalityBatch({"a": torch.ones(1, 2)})
    with pytest.raises(TypeError, match="mix ModalityBatch and mapping"):
        collate_modalities([one, {"inputs": {"a": torch.ones(2)}}])
    # targets on some samples only: an error, whichever sample comes first (the first sample's
    # lack of one used to drop every label silently)
    labelled, unlabelled = (
        {"inputs": {"a": torch.ones(2)}, "target": 1},
        {"inputs": {"a": torch.ones(2)}},
    )
    for samples in ([unlabelled, labelled, labelled], [labelled, unlabelled, labelled]):
        with pytest.raises(ValueError, match=r"samples \[\d\] have no target but the others do"):
            collate_modalities(samples)
    assert collate_modalities([unlabelled, unlabelled]).target is None
    ragged = [{"inputs": {"a": torch.ones(2)}, "target": torch.ones(k)} for k in (2, 3)]
    with pytest.raises(ValueError, match=r"targets have different shapes \[\(2,\), \(3,\)\]"):
        collate_modalities(ragged)


def test_collate_reads_flat_rows_with_named_modalities_and_target_key():
    """A ``datasets`` row ``{modality: ..., label: ..., id: ...}``: the same batch as the nested
    form, read with ``modalities=`` and ``target_key=``."""
    import functools

    rows = [
        {"text": torch.randn(3 + i, 4), "audio": torch.randn(5), "label": i % 2, "id": f"s{i}"}
        for i in range(4)
    ]
    nested = collate_modalities(
        [{"inputs": {"text": r["text"], "audio": r["audio"]}, "target": r["label"]} for r in rows]
    )
    collate = functools.partial(
        collate_modalities, modalities=("text", "audio"), target_key="label"
    )
    loader = torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=collate)
    flat = next(iter(loader))
    assert flat.modalities == nested.modalities == ("text", "audio")
    for m in nested.modalities:
        torch.testing.assert_close(flat[m], nested[m])
    torch.testing.assert_close(flat.padding_mask("text"), nested.padding_mask("text"))
    assert flat.target.tolist() == [0, 1, 0, 1]
    # without modalities=, every key but the target is one: the id is not a tensor
    with pytest.raises(TypeError, match=r"sample 0's 'id' is a str, not a tensor.*modalities="):
        collate_modalities(rows, target_key="label")
    no_ids = [{k: v for k, v in r.items() if k != "id"} for r in rows]
    assert collate_modalities(no_ids, target_key="label").modalities == ("text", "audio")
    with pytest.raises(KeyError, match=r"sample 0 has no \['video'\]; its keys are"):
        collate_modalities(rows, modalities=("text", "video"), target_key="label")
    with pytest.raises(KeyError, match=r"sample 0 has no \['y'\]"):
        collate_modalities(rows, modalities=("text",), target_key="y")


def test_batches_pickle_for_dataloader_workers():
    import pickle

    batch = make_batch().with_missing("vec", torch.tensor([True, False, False, True]))
    back = pickle.loads(pickle.dumps(batch))
    assert back.modalities == batch.modalities and back.sample_ids == batch.sample_ids
    assert torch.equal(back.is_present("vec"), batch.is_present("vec"))
    assert torch.equal(back.padding_mask("text"), batch.padding_mask("text"))


def test_bad_calls_of_the_batch_methods_raise_clear_errors():
    batch = make_batch()
    with pytest.raises(TypeError, match=r"replace\(\) got unknown fields \['input'\]"):
        batch.replace(input={})
    with pytest.raises(TypeError, match=r"missing: expected a bool tensor of shape \(4,\)"):
        batch.with_missing("text", torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"concat\(\) needs at least one batch"):
        ModalityBatch.concat([])
    with pytest.raises(ValueError, match="some batches have a target and others do not"):
        ModalityBatch.concat([batch, batch.replace(target=None)])
    with pytest.raises(ValueError, match="collate_modalities: empty list of samples"):
        collate_modalities([])
