"""Reference quantizers: bit-exact parity with bitsandbytes, storage, footprint, errors, saving."""

import itertools
import math
import os

import pytest
import torch

from qlora_guide import quantization as Q
from qlora_guide.errors import QLoRAGuideError

bnbf = pytest.importorskip("bitsandbytes.functional")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((64,), (1,), (63,), (5, 37), (128, 7), (257, 129), (2, 3, 65), (64 * 256 * 2 + 17,))


@pytest.fixture(autouse=True, scope="module")
def _no_recompiles():
    """bitsandbytes' CPU fallback for odd shapes is torch.compile'd; compiling every shape only costs time."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def _weights(shape, dtype, seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    scale = (0.02, 1.0, 30.0)[seed % 3]  # LLM-like, unit and large magnitudes
    return (torch.randn(shape, generator=generator) * scale).to(dtype).to(device)


# ---------------------------------------------------------------- codebooks


def test_derived_nf4_codebook_is_bitsandbytes_table_bit_for_bit():
    derived = Q.nf4_code()
    assert torch.equal(derived, bnbf.get_4bit_type("nf4", device="cpu"))
    assert derived.dtype == torch.float32
    assert (derived < 0).sum() == 7 and (derived == 0).sum() == 1 and (derived > 0).sum() == 8
    assert derived[0] == -1 and derived[-1] == 1


def test_fp4_and_dynamic_codebooks_match_bitsandbytes():
    assert torch.equal(Q.fp4_code(), bnbf.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(Q.dynamic_code(), bnbf.create_dynamic_map())


def test_nf4_levels_split_normal_distribution_into_equal_mass_bins():
    """The QLoRA construction: each positive level is a quantile of N(0,1) at evenly spaced probabilities."""
    code = Q.nf4_code()
    positive = code[code > 0].double() * torch.special.ndtri(torch.tensor(Q.NF4_OFFSET, dtype=torch.float64))
    probs = torch.special.ndtr(positive)
    steps = probs.diff()
    assert torch.allclose(steps, steps.mean().expand_as(steps), atol=1e-6)


# ---------------------------------------------------------------- parity with bitsandbytes


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
def test_bit_exact_parity_with_bitsandbytes_cpu(quant_type, double_quant):
    cases = list(itertools.product(SHAPES, DTYPES, (0, 1, 2)))
    for (shape, dtype, seed), blocksize in zip(cases, itertools.cycle((64, 32, 128, 256, 4096))):
        x = _weights(shape, dtype, seed)
        report = Q.compare_with_bitsandbytes(x, quant_type, blocksize, double_quant)
        assert report["equal"], report


def test_parity_on_edge_values():
    """Zeros (full and partial blocks), FP4's signed zeros, exact midpoints, constant absmax (0/0 when nested)."""
    code = Q.nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    edge = torch.cat([torch.ones(1), midpoints, -midpoints, torch.tensor([1e-4, -1e-4, 0.0, -0.0, 2e-3, -2e-3])])
    cases = [
        torch.zeros(130),
        torch.cat([torch.randn(64), torch.zeros(64), torch.zeros(5)]),
        torch.nn.functional.pad(edge, (0, 64 - edge.numel())).repeat(10),
        torch.ones(64 * 300),  # every absmax equal: the nested block is 0/0
        torch.randn(64 * 257).abs() + 5,
    ]
    for x, (quant_type, double_quant) in itertools.product(cases, [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]):
        report = Q.compare_with_bitsandbytes(x, quant_type, 64, double_quant)
        assert report["equal"], report


def test_nibble_order_and_packing():
    codes = torch.tensor([1, 2, 3, 4, 15], dtype=torch.uint8)
    packed = Q.pack_4bit(codes)
    assert packed.tolist() == [0x12, 0x34, 0xF0]  # first code in the high nibble, odd count padded
    assert torch.equal(Q.unpack_4bit(packed, 5), codes)


def test_odd_count_pads_with_the_code_of_zero():
    x = torch.tensor([1.0, -1.0, 0.5])
    nf4 = Q.quantize_4bit(x, "nf4")
    assert nf4.codes.reshape(-1)[-1] & 0x0F == 7  # NF4's exact zero, not code 0 (= -1.0)


def test_dequantize_restores_shape_and_dtype():
    for dtype in DTYPES:
        x = _weights((3, 5, 7), dtype, 0)
        y = Q.dequantize_4bit(Q.quantize_4bit(x, "nf4", 64, double_quant=True))
        assert y.shape == x.shape and y.dtype == dtype
        assert (y.float() - x.float()).abs().max() <= x.float().abs().max() * 0.2


def test_8bit_blockwise_matches_bitsandbytes_cpu_kernel():
    generator = torch.Generator().manual_seed(0)
    near_zero = torch.tensor([1.0, 0.0, 1e-7, -1e-7, 3e-5, -3e-5, 1e-4, 0.0240625])  # where the 16-bit grid shows
    codes, _ = Q.quantize_blockwise_8bit(near_zero)
    assert Q.dynamic_code()[codes[1].long()] == pytest.approx(2.125e-5)  # zero is not kept as zero
    for scale in (None, 1e-3, 1.0, 1e3):
        x = near_zero if scale is None else torch.randn(5000, generator=generator) * scale
        codes, absmax = Q.quantize_blockwise_8bit(x)
        ref_codes, state = bnbf.quantize_blockwise(x, blocksize=256)
        assert torch.equal(codes, ref_codes) and torch.equal(absmax, state.absmax)
        assert torch.equal(Q.dequantize_blockwise_8bit(codes, absmax), bnbf.dequantize_blockwise(ref_codes, state))


@pytest.mark.gpu
def test_parity_with_bitsandbytes_cuda():
    """Against bitsandbytes' CUDA kernels, which differ from its CPU path in the ways qlora_guide.quantization.parity documents."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cases = itertools.product(SHAPES + ((4096, 4096),), DTYPES, (0, 1), ("nf4", "fp4"), (False, True))
    for shape, dtype, seed, quant_type, double_quant in cases:
        x = _weights(shape, dtype, seed, device="cuda")
        report = Q.compare_with_bitsandbytes(x, quant_type, 64, double_quant)
        assert report["codebook_equal"] and report["dequantized_dtype_equal"], report
        if double_quant:  # same mean and nested absmax; the 8-bit codes differ where CUDA skips the 16-bit grid
            assert report["offset_equal"] and report["nested_code_equal"] and report["nested_absmax_differ"] == 0, report
            assert report["absmax_differ"] <= 0.01 * math.ceil(x.numel() / 64) + 2, report
        else:
            assert report["absmax_differ"] == 0, report
        if quant_type == "nf4" and not double_quant and dtype != torch.float32:
            assert report["equal"], report  # NF4 from 16-bit weights: bit-exact on CUDA too
        if quant_type == "nf4":
            assert report["codes_differ"] <= 1e-6 * x.numel() + 1, report  # float32: a value within an ulp of a midpoint
        if not double_quant:  # FP4: the sign of zero, and exact ties on the negative side
            assert report["dequantized_differ"] <= 1e-3 * x.numel() + 2, report


# ---------------------------------------------------------------- storage


def test_bits_per_parameter_from_bytes_on_synthetic_matrix():
    x = torch.randn(4096, 4096, dtype=torch.bfloat16)
    single = Q.quantize_4bit(x, "nf4", 64)
    double = Q.quantize_4bit(x, "nf4", 64, double_quant=True)
    assert single.bits_per_parameter == 4.5  # 4 bits + a float32 absmax per 64 values
    # 4 bits + one uint8 per 64 + one float32 per 64*256 + the float32 offset
    assert double.bits_per_parameter == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / x.numel(), rel=1e-12)
    assert double.codebook_nbytes == (16 + 256) * 4


@pytest.fixture(scope="module")
def bf16_model():
    from qlora_guide.models import load_model

    return load_model("smollm2-135m", dtype="bfloat16", device_map="cpu")


def test_bits_per_parameter_of_a_real_layer(bf16_model):
    weight = bf16_model.model.layers[0].self_attn.q_proj.weight.detach()
    assert Q.quantize_4bit(weight, "nf4", 64).bits_per_parameter == 4.5
    dq = Q.quantize_4bit(weight, "nf4", 64, double_quant=True).bits_per_parameter
    assert round(dq, 3) == 4.127
    # the same bytes as bitsandbytes stores for this layer
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    tensors = [packed, state.absmax, state.state2.absmax, state.offset]
    assert 8 * sum(t.numel() * t.element_size() for t in tensors) / weight.numel() == dq


def test_absmax_int8_int4_granularities():
    x = torch.randn(64, 256)
    x[3, 7] = 40.0  # one outlier
    errors = {}
    for bits, granularity in itertools.product((8, 4), Q.GRANULARITIES):
        qx = Q.absmax_quantize(x, bits=bits, granularity=granularity, blocksize=64)
        y = Q.absmax_dequantize(qx)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert (y - x).abs().max() <= qx.scale.max() / 2 + 1e-6  # round to nearest: half a step at most
        errors[bits, granularity] = float((y - x).pow(2).mean())
    for bits in (8, 4):  # smaller groups isolate the outlier
        assert errors[bits, "block"] < errors[bits, "channel"] < errors[bits, "tensor"]
    assert errors[8, "block"] < errors[4, "block"]
    int4 = Q.absmax_quantize(x, bits=4, granularity="block", blocksize=64)
    assert int4.q.numel() == x.numel() // 2  # two 4-bit values per byte
    assert int4.bits_per_parameter == 4 + 32 / 64


# ---------------------------------------------------------------- error analysis


def test_nf4_has_lowest_error_on_normal_weights():
    rows = Q.error_table(name_or_path=None, gaussian_size=1 << 18)
    mse = {row["method"]: row["mse"] for row in rows}
    assert mse["nf4 (block 64)"] < mse["fp4 (block 64)"]
    assert mse["nf4 (block 64)"] < mse["int4 absmax (block 64)"]
    assert mse["int8 absmax (tensor)"] < mse["nf4 (block 64)"]
    assert mse["nf4 + dq (block 64)"] == pytest.approx(mse["nf4 (block 64)"], rel=0.01)  # DQ costs almost nothing
    for row in rows:
        assert row["snr_db"] == pytest.approx(10 * math.log10(1 / row["mse"]), abs=0.1)  # unit-variance signal


def test_error_table_on_real_weights_by_layer_type(bf16_model):
    rows = Q.error_table("smollm2-135m", methods=("nf4 (block 64)", "fp4 (block 64)"), gaussian_size=1 << 12, layers=(0,))
    layer_rows = [row for row in rows if row["weights"] != "N(0,1)"]
    assert {row["weights"] for row in layer_rows} == set(Q.LAYER_TYPES)
    q_proj = bf16_model.model.layers[0].self_attn.q_proj.weight
    assert next(r for r in layer_rows if r["weights"] == "q_proj")["numel"] == q_proj.numel()
    for kind in Q.LAYER_TYPES:
        by_method = {r["method"]: r["snr_db"] for r in layer_rows if r["weights"] == kind}
        assert by_method["nf4 (block 64)"] > by_method["fp4 (block 64)"], kind


# ---------------------------------------------------------------- footprint and saving


@pytest.fixture(scope="module")
def saved_nf4(tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "nf4"
    return Q.quantize_model("smollm2-135m", out)


@pytest.mark.slow
def test_quantize_model_reloads_as_linear4bit_with_same_logits(saved_nf4):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from qlora_guide.config import QuantizationConfig
    from qlora_guide.models import load_model
    from qlora_guide.precision import follow_cpu_bf16_setting

    out = saved_nf4.output_dir
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    assert not [p for p in os.listdir(os.path.dirname(out)) if p.startswith(".nf4-")], "no staging folder left"
    assert saved_nf4.quantized_layers == 30 * 7
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    layer = reloaded.model.layers[3].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested
    in_memory = load_model("smollm2-135m", quantization=QuantizationConfig(), device_map="cpu")
    follow_cpu_bf16_setting(reloaded)  # the same bitsandbytes CPU kernel as load_model picks on this precision path
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 2]])
    with torch.no_grad():
        assert torch.equal(in_memory(ids).logits, reloaded(ids).logits)


@pytest.mark.slow
def test_footprint_of_real_model(saved_nf4, bf16_model):
    from transformers import AutoModelForCausalLM

    nf4 = Q.model_footprint(AutoModelForCausalLM.from_pretrained(saved_nf4.output_dir))  # before any forward pass
    bf16 = Q.model_footprint(bf16_model)
    params = sum(p.numel() for p in bf16_model.parameters())  # tied head listed once
    assert bf16["parameters"] == nf4["parameters"] == params
    assert bf16["tied_lm_head"] and nf4["tied_lm_head"] and bf16["by_kind"]["lm_head"] == 0
    assert bf16["total_bytes"] == 2 * params + bf16["by_kind"]["other"]  # only the rotary buffer is not a weight
    embed = bf16_model.model.embed_tokens.weight
    assert nf4["by_kind"]["embeddings"] == bf16["by_kind"]["embeddings"] == embed.numel() * 2  # stays bf16
    assert nf4["by_kind"]["norms"] == bf16["by_kind"]["norms"]
    assert nf4["total_bytes"] < 0.5 * bf16["total_bytes"]
    assert nf4["total_bytes"] == saved_nf4.memory_bytes
    # the linear layers really are ~4.13 bits per weight (plus 64 + 1024 bytes of codebooks per layer)
    linear_params = params - embed.numel() - sum(p.numel() for n, p in bf16_model.named_parameters() if "norm" in n)
    linear_bits = 8 * (nf4["by_kind"]["attention"] + nf4["by_kind"]["mlp"]) / linear_params
    assert 4.12 < linear_bits < 4.2
    storage = nf4["by_storage"]  # the same bytes sorted by how they are stored
    assert sum(storage.values()) == nf4["total_bytes"] and storage["lora"] == 0
    assert storage["quantized"] == linear_params // 2  # two 4-bit codes per byte
    assert storage["quant_constants"] == nf4["quant_constants_bytes"]
    assert bf16["by_storage"]["other"] == bf16["total_bytes"]


def test_tensor_bytes_counts_tied_tensors_once_and_sorts_by_storage():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # a tied head
    model.add_module("lora_A", torch.nn.Linear(4, 2, bias=False))
    counted = Q.tensor_bytes(model)
    assert counted["by_storage"] == {"quantized": 0, "quant_constants": 0, "lora": 2 * 4 * 4, "other": 10 * 4 * 4}
    assert counted["total_bytes"] == sum(counted["by_kind"].values()) == (10 + 2) * 4 * 4
    assert counted["parameters"] == (10 + 2) * 4
    int8, _ = Q.torch_dynamic_int8(torch.nn.Sequential(torch.nn.Linear(8, 4)))
    counted = Q.tensor_bytes(int8)
    assert counted["by_storage"]["quantized"] == 8 * 4 and counted["by_storage"]["other"] == 4 * 4  # int8 weight, fp32 bias
    assert counted["parameters"] == 8 * 4 + 4


def test_footprint_table_rows(bf16_model):
    rows = Q.footprint_table("smollm2-135m", variants=("fp32", "bf16"))
    fp32, bf16 = rows
    assert fp32["total_bytes"] - fp32["other_bytes"] == 2 * (bf16["total_bytes"] - bf16["other_bytes"])
    assert bf16["reduction_vs_fp32"] == pytest.approx(0.5, abs=1e-4)
    assert fp32["reduction_vs_bf16"] == pytest.approx(-1.0, abs=1e-3)


@pytest.mark.slow
def test_dynamic_quantization_shrinks_linear_layers():
    report = Q.dynamic_quantization_report("smollm2-135m", seq_len=16, repeats=1)
    assert report["quantized_linear_layers"] == 30 * 7 + 1  # every projection, and the (tied) output head
    # int8 is a quarter of fp32, but the tied head (in no fp32 "linear" byte before) adds its own int8 copy
    assert 0.25 * report["linear_bytes_before"] < report["linear_bytes_after"] < 0.35 * report["linear_bytes_before"]
    assert report["serialized_bytes_after"] < report["serialized_bytes_before"]
    assert report["embedding_bytes_after"] > 0  # the fp32 embedding stays; the head is now an int8 copy
    assert report["deprecated"] and report["alternative"].startswith("torchao")
    assert 0 <= report["top1_agreement"] <= 1 and report["max_abs_logit_diff"] > 0  # measured, not assumed


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "x,kwargs,message",
    [
        (torch.empty(0), {}, "empty"),
        (torch.tensor([1.0, float("nan")]), {}, "NaN"),
        (torch.tensor([1.0, float("inf")]), {}, "inf"),
        (torch.arange(4), {}, "int64"),
        (torch.randn(64), {"blocksize": 48}, "power of two"),
        (torch.randn(64), {"blocksize": 8192}, "not supported by bitsandbytes"),
        (torch.randn(64), {"quant_type": "nf3"}, "unknown quant_type"),
    ],
)
def test_bad_input_names_the_problem(x, kwargs, message):
    with pytest.raises(QLoRAGuideError, match=message):
        Q.quantize_4bit(x, **kwargs)


def test_bad_absmax_input():
    with pytest.raises(QLoRAGuideError, match="power of two"):
        Q.absmax_quantize(torch.randn(10), granularity="block", blocksize=3)
    with pytest.raises(QLoRAGuideError, match="granularity"):
        Q.absmax_quantize(torch.randn(10), granularity="row")
    with pytest.raises(QLoRAGuideError, match="NaN"):
        Q.absmax_quantize(torch.tensor([float("nan")]))


def test_quantize_model_refuses_bad_requests(tmp_path):
    with pytest.raises(QLoRAGuideError, match="unknown quant type"):
        Q.quantize_model("smollm2-135m", tmp_path / "x", quant_type="int3")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(QLoRAGuideError, match="not empty"):
        Q.quantize_model("smollm2-135m", busy)
    assert (busy / "keep.txt").read_text() == "mine"
    encoder = tmp_path / "bert"
    encoder.mkdir()
    (encoder / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(QLoRAGuideError, match="not a causal language model"):
        Q.quantize_model(str(encoder), tmp_path / "out")
    assert not (tmp_path / "out").exists()
