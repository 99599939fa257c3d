"""bench.py through its entry point, tiny and on the CPU: every task prints sane numbers (positive, finite
throughput; MFU in (0, 100] against the matmul peak measured in the run), the --compare rows are there with
FLOP counts that agree with the references', the GPU suite skips on a CPU and its dry run covers every entry,
and profile=True writes a trace."""

import glob
import math
import os

import pytest
import torch

import bench

TINY = ["--threads=1", "--warmup_iters=1", "--iters=2"]
GPT_TINY = ["--task=gpt", "--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=32", "--vocab_size=256",
            "--batch_size=2"]


@pytest.fixture(autouse=True)
def keep_threads():
    """bench.main sets torch's thread count, as the script should; give the other test files theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def check_sane(rows, with_flops=True):
    assert rows, "no rows returned"
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        assert r["ms"] > 0 and math.isfinite(r["ms"]), r
        assert r["rate"] > 0 and math.isfinite(r["rate"]), r
        assert r["peak_mb"] > 0, r
        assert r["ratio"] == pytest.approx(r["ms"] / by_name[r["baseline"]]["ms"]), r
        if with_flops:
            assert r["peak_flops"] and r["peak_flops"] > 1e8, f"no CPU matmul peak measured: {r}"
            assert 0 < r["mfu"] <= 100, f"MFU {r['mfu']} outside (0, 100]: {r}"
            assert r["tflops"] * 1e12 / r["peak_flops"] * 100 == pytest.approx(r["mfu"])
        else:
            assert r["mfu"] is None and r["tflops"] is None
    return by_name


def test_classify_smoke_units_and_mfu():
    rows = bench.main(["--model=convnext_atto", "--batch_size=2", "--image_size=32", "--num_classes=5", *TINY])
    (r,) = rows
    check_sane(rows)
    assert r["name"] == "nanorad convnext_atto" and r["unit"] == "img/s" and r["baseline"] == r["name"]
    assert r["rate"] == pytest.approx(2 * 1000 / r["ms"])
    assert r["ratio"] == 1.0


def test_classify_compare_timm_rows_and_flops_agree():
    """Ours and timm's ConvNeXt / ViT are the same networks: the FLOPs counted per step must agree."""
    pytest.importorskip("timm")
    rows = bench.main(["--model=convnext_atto,vit_tiny", "--batch_size=2", "--image_size=32", "--compare=True", *TINY])
    by = check_sane(rows)
    assert list(by) == ["nanorad convnext_atto", "timm convnext_atto", "nanorad vit_tiny", "timm vit_tiny_patch16_224"]
    assert by["timm convnext_atto"]["baseline"] == "nanorad convnext_atto"
    assert by["timm vit_tiny_patch16_224"]["baseline"] == "nanorad vit_tiny"
    for ours, ref in (("nanorad convnext_atto", "timm convnext_atto"), ("nanorad vit_tiny", "timm vit_tiny_patch16_224")):
        flops = [by[n]["tflops"] * by[n]["ms"] for n in (ours, ref)]  # FLOPs per step, in TFLOP * ms
        assert flops[0] == pytest.approx(flops[1], rel=0.02), (ours, ref, flops)


def test_compare_unknown_to_timm_names_the_valid_ones():
    with pytest.raises(ValueError, match="timm has no counterpart of 'vit_cxr'.*convnext_tiny"):
        bench.main(["--model=vit_cxr", "--compare=True", *TINY])


def test_gpt_compare_hf_and_position_schemes():
    pytest.importorskip("transformers")
    rows = bench.main([*GPT_TINY, "--compare=True", *TINY])
    by = check_sane(rows)
    assert list(by) == ["nanorad GPT learned", "HF GPT2LMHeadModel (sdpa)", "nanorad GPT alibi", "nanorad GPT rope"]
    assert all(r["unit"] == "tok/s" and r["baseline"] == "nanorad GPT learned" for r in rows)
    lib = bench.gptlib()
    expected = lib.GPT(lib.GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=4, n_embd=64)).flops_per_token(32) * 2 * 32
    for r in rows:
        assert r["rate"] == pytest.approx(2 * 32 * 1000 / r["ms"])
        assert r["tflops"] * 1e12 * r["ms"] / 1000 == pytest.approx(expected)


def test_clip_smoke():
    rows = bench.main(["--task=clip", "--image_size=32", "--batch_size=3", *TINY])
    (r,) = check_sane(rows).values()
    assert r["unit"] == "pairs/s" and r["rate"] == pytest.approx(3 * 1000 / r["ms"])


def test_data_compare_memmap_vs_pil():
    rows = bench.main(["--task=data", "--image_size=32", "--batch_size=4", "--data_images=12", "--compare=True", *TINY])
    by = check_sane(rows, with_flops=False)
    pil = "PIL ImageFolder + RandomResizedCrop (0 workers)"
    assert list(by) == ["memmap + augment", "memmap + crop only", "memmap uint8 read", pil]
    assert by[pil]["baseline"] == "memmap + crop only" and by["memmap uint8 read"]["baseline"] == "memmap + augment"
    assert all(r["unit"] == "img/s" and r["rate"] == pytest.approx(4 * 1000 / r["ms"]) for r in rows)


def test_real_data_classify_and_data(tiny_phantom):
    rows = bench.main(["--real_data=True", f"--data_dir={tiny_phantom}", "--model=convnext_atto", "--in_chans=1",
                       "--batch_size=4", *TINY])
    check_sane(rows)
    rows = bench.main(["--task=data", "--real_data=True", f"--data_dir={tiny_phantom}", "--batch_size=4",
                       "--data_images=16", *TINY])
    check_sane(rows, with_flops=False)


def test_real_data_missing_folder_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="python data.py"):
        bench.main(["--real_data=True", f"--data_dir={tmp_path}/nothing", "--model=convnext_atto", *TINY])


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match="classify, gpt, clip, data"):
        bench.main(["--task=detect"])


def test_gpu_suite_skips_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the suite would run")
    assert bench.main(["--suite=gpu"]) == []
    assert "skipped, no CUDA GPU" in capsys.readouterr().out


def test_gpu_suite_dry_run_covers_every_entry(capsys):
    pytest.importorskip("torchvision")
    rows = bench.main(["--suite=gpu", "--dry_run=True", "--threads=1"])
    assert [label for label, _ in bench.SUITE_GPU] == list(dict.fromkeys(r["run"] for r in rows))
    for r in rows:
        assert r["rate"] > 0 and math.isfinite(r["rate"]) and r["device"] == "cpu", r
    gpt = [r for r in rows if r["task"] == "gpt"]
    assert gpt and all(0 < r["mfu"] <= 100 for r in gpt)
    out = capsys.readouterr().out
    assert "README table: CPU dry run" in out and out.count("| ConvNeXt-T, batch 128 |") == 1


def test_profile_writes_a_trace(tmp_path):
    bench.main(["--model=convnext_atto", "--batch_size=2", "--image_size=32", "--profile=True",
                f"--out_dir={tmp_path}", "--threads=1", "--warmup_iters=1", "--iters=3"])
    traces = glob.glob(os.path.join(tmp_path, "profile", "*.pt.trace.json*"))
    assert traces, f"no trace in {tmp_path}/profile: {os.listdir(tmp_path)}"
    assert os.path.getsize(traces[0]) > 1000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_channels_last_fused():
    rows = bench.main(["--model=convnext_atto", "--batch_size=8", "--image_size=64", "--device=cuda", "--dtype=bfloat16",
                       "--channels_last=True", "--optimizer=fused", "--warmup_iters=2", "--iters=3"])
    (r,) = rows
    assert r["rate"] > 0 and r["peak_mb"] > 0
    assert r["mfu"] is None or 0 < r["mfu"] <= 100
