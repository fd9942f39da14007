import pytest
import torch

from mm_prompts import (
    all_cases,
    apply_case,
    case_from_presence,
    case_name,
    presence_from_case,
    reference_case_to_mask,
    simulate_missing,
)
from mmcore import ModalityBatch

MODS = ("text", "audio", "vision")


def batch(n=6):
    return ModalityBatch({m: torch.ones(n, 2, 3) for m in MODS}, target=torch.zeros(n))


def test_cases_are_bitmasks():
    assert all_cases(3) == [1, 2, 3, 4, 5, 6, 7]
    assert all_cases(1) == [1] and all_cases(1, include_complete=False) == []
    assert len(all_cases(6)) == 63 and len(all_cases(4, include_complete=False)) == 14
    presence = presence_from_case(torch.tensor([1, 6, 7]), 3)
    assert presence.tolist() == [[True, False, False], [False, True, True], [True, True, True]]
    assert case_from_presence(presence).tolist() == [1, 6, 7]
    assert case_name(5, MODS) == "{text, vision}"


def test_reference_case_numbering():
    # k=0: text missing -> audio+vision present (bits 1, 2) = 6; k=6: complete = 7
    assert [reference_case_to_mask(k) for k in range(7)] == [6, 5, 3, 4, 2, 1, 7]
    with pytest.raises(ValueError, match=r"0\.\.6"):
        reference_case_to_mask(7)


def test_apply_case_and_simulation():
    b = apply_case(batch(3), torch.tensor([1, 2, 7]))
    assert b.is_present("text").tolist() == [True, False, True]
    assert b["audio"][0].abs().sum() == 0 and b["audio"][1].abs().sum() > 0
    g = torch.Generator().manual_seed(0)
    sim, cases = simulate_missing(batch(4000), 0.7, generator=g)
    complete = (cases == 7).float().mean().item()
    assert complete == pytest.approx(0.3, abs=0.03)
    assert (cases[cases != 7].bincount(minlength=7)[1:7].float() / 4000).sub(
        0.7 / 6
    ).abs().max() < 0.03
    torch.testing.assert_close(
        case_from_presence(torch.stack([sim.is_present(m) for m in MODS], 1)), cases
    )
    torch.testing.assert_close(case_from_presence(sim), cases)  # the same, from the batch


def test_cases_of_a_batch_in_a_models_modality_order():
    """``case_from_presence(batch, modalities)``: bit i is modalities[i]; a modality the batch
    lacks is missing from every sample."""
    b = apply_case(batch(3), torch.tensor([1, 2, 7]))  # bits in (text, audio, vision) order
    assert case_from_presence(b).tolist() == [1, 2, 7]
    assert case_from_presence(b, ("vision", "audio", "text")).tolist() == [4, 2, 7]
    assert case_from_presence(b, (*MODS, "depth")).tolist() == [1, 2, 7]  # bit 3 never set
    with pytest.raises(TypeError, match="modalities= goes with a ModalityBatch"):
        case_from_presence(torch.ones(2, 3, dtype=torch.bool), MODS)
    with pytest.raises(TypeError, match=r"a bool presence matrix .* or a ModalityBatch, got list"):
        case_from_presence([[True, False]])
    with pytest.raises(TypeError, match=r"num_modalities must be an int \(len\(modalities\)\)"):
        presence_from_case(3, MODS)


def test_simulation_on_a_batch_that_already_lacks_modalities():
    # text missing in the first half: those samples can only lose audio or vision
    n = 4000
    partial = batch(n).with_missing("text", torch.arange(n) < n // 2)
    g = torch.Generator().manual_seed(0)
    sim, cases = simulate_missing(partial, 1.0, generator=g)
    presence = torch.stack([sim.is_present(m) for m in MODS], 1)
    torch.testing.assert_close(case_from_presence(presence), cases)  # the cases it returns
    first, second = cases[: n // 2], cases[n // 2 :]
    assert not presence[: n // 2, 0].any()  # a missing modality never comes back
    # {audio, vision} (6) loses one of them, uniformly: {audio} (2) or {vision} (4)
    assert set(first.tolist()) == {2, 4}
    assert (first == 2).float().mean().item() == pytest.approx(0.5, abs=0.04)
    # complete samples draw among all six incomplete cases
    assert set(second.tolist()) == set(range(1, 7))
    # a sample with one modality left keeps it
    single = apply_case(batch(4), torch.tensor([1, 2, 4, 3]))
    again, kept = simulate_missing(single, 1.0, generator=g)
    assert kept[:3].tolist() == [1, 2, 4] and kept[3].item() in (1, 2)  # {text, audio}: one
    assert again.is_present("text").tolist() == [True, False, False, kept[3].item() == 1]


def test_complete_batches_draw_the_released_protocol_exactly():
    # the draw the benchmarks' figures come from: rate test, then a uniform incomplete case
    g = torch.Generator().manual_seed(3)
    _, cases = simulate_missing(batch(50), 0.7, generator=torch.Generator().manual_seed(3))
    drop = torch.rand(50, generator=g) < 0.7
    pick = torch.tensor(all_cases(3, include_complete=False))[torch.randint(6, (50,), generator=g)]
    assert cases.tolist() == torch.where(drop, pick, torch.tensor(7)).tolist()


def test_bad_cases_raise():
    with pytest.raises(ValueError, match=r"invalid missing cases \[0, 8\]"):
        presence_from_case(torch.tensor([0, 3, 8]), 3)
    for not_bitmasks in (torch.tensor([3.0, 1.0]), torch.tensor([True, False])):
        with pytest.raises(ValueError, match=r"integer bitmasks.*got torch\.(float32|bool)"):
            apply_case(batch(2), not_bitmasks)  # a float tensor failed inside a bit shift
    with pytest.raises(ValueError, match=r"samples \[1\] have every modality missing"):
        case_from_presence(torch.tensor([[True, False], [False, False]]))
    with pytest.raises(
        ValueError, match=r"presence must be a bool \[B, M\] tensor, got torch.float32"
    ):
        case_from_presence(torch.ones(2, 3))  # 0/1 floats, not flags
    with pytest.raises(ValueError, match=r"presence must be a bool \[B, M\] tensor.*\(3,\)"):
        case_from_presence(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one modality"):
        all_cases(0)
    with pytest.raises(ValueError, match="rate"):
        simulate_missing(batch(), 1.5)
    two = ModalityBatch({m: torch.ones(40, 2, 3) for m in MODS[:2]})
    _, cases = simulate_missing(two, 1.0, generator=torch.Generator().manual_seed(0))
    assert set(cases.tolist()) == {1, 2}  # two modalities: each incomplete case is one of them
    with pytest.raises(ValueError, match=">= 2 modalities"):
        simulate_missing(ModalityBatch({"text": torch.ones(4, 2, 3)}), 0.5)
    with pytest.raises(ValueError, match=r"expected shape \(6,\)"):
        apply_case(batch(), torch.tensor([1, 2]))
    no_text = batch(3).with_missing("text", torch.tensor([False, True, False]))
    with pytest.raises(ValueError, match=r"samples \[1\] would have no modality present"):
        apply_case(no_text, torch.tensor([1, 1, 3]))  # text only, for a sample without text
