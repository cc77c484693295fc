"""Quantization: a bit width (or GGUF type) per decoder linear, under an average-bit or a byte budget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from ..allocate.bits import BIT_ALLOCATORS, BitContext, check_bit_budget, linear_statistics
from ..allocate.levels import GGUFLevels, parse_levels
from ..config import Budget
from ..errors import BudgetError
from ..export.gguf_export import non_linear_bytes
from ..gguf import gguf_type
from ..models import LoadedModel, decoder_linears, get_adapter
from ..ops.awq import check_awq_layout
from ..ops.quantize import QUANTIZERS, group_bounds, quantized_storage
from ..plan import Plan
from .base import PlanRequest, Structure, StructureOptions, check_params, option, register

if TYPE_CHECKING:
    from ..options import PlanOptions


class QuantOptions(StructureOptions):
    """Quantization: the budget (average bits or bytes), the grid, AWQ/GPTQ and GGUF (the searches': theirs)."""

    avg_bits: Optional[float] = option("quant: average bits per decoder-linear weight the plan may use.", budget=True)
    max_bytes: Optional[int] = option("quant with GGUF types, and joint: at most this many tensor bytes in "
                                      "the GGUF file (embeddings and norms included).", budget=True)
    bits: Optional[str] = option("quant: bit width (uniform), or the choices 3,4,8 (greedy); or GGUF types, e.g. "
                                 "q4_k,q5_0,q6_k,q8_0 (llama.cpp's grids and quantizers).")
    group_size: Optional[int] = option("quant: inputs per scale group (default 128; a shorter last group when it "
                                       "does not divide; 0 = per channel).")
    symmetric: Optional[bool] = option("quant: symmetric codes (default asymmetric).", "--symmetric/--asymmetric")
    awq: Optional[bool] = option("quant: AWQ first (its scale and clipping searches, as llm-awq runs them), then rtn "
                                 "or gptq.", "--awq/--no-awq")
    act_order: Optional[bool] = option("quant gptq: columns by decreasing Hessian diagonal, static groups (default "
                                       "on).", "--act-order/--no-act-order")
    imatrix: Optional[bool] = option("quant with GGUF types: weight llama.cpp's quantizer by the calibration's mean "
                                     "squared inputs (an importance matrix).", "--imatrix/--no-imatrix")
    llamacpp_activations: Optional[bool] = option(
        "quant with GGUF types: the searches score candidates with llama.cpp's rounding of activations (q8_0/q8_K "
        "blocks, f16) simulated, as the file will compute.", "--llamacpp-activations/--float-activations")
    embedding_type: Optional[str] = option("GGUF type of the token embedding in the export and in --max-bytes "
                                           "(default q8_0 for quantized and joint plans).")


def check_floors(context, budget: Budget, embedding_type: str) -> int | None:
    """Refuse a budget below what every linear at its narrowest level reaches, naming that smallest value; the
    bytes outside the linears when the budget is in bytes (None otherwise)."""

    check_bit_budget(context, budget.avg_bits)
    if budget.max_bytes is None:
        return None
    if not isinstance(context.levels, GGUFLevels):
        raise BudgetError("--max-bytes counts bytes as llama.cpp stores them; use GGUF types in --bits.")

    fixed_bytes = non_linear_bytes(context.model, embedding_type)
    smallest = fixed_bytes + context.total_bits({name: context.options(name)[0] for name in context.linears}) / 8
    if budget.max_bytes < smallest:
        raise BudgetError(f"--max-bytes {budget.max_bytes:,} is below the smallest file these types reach, "
                          f"{smallest:,.0f} bytes (every linear at its narrowest type; {fixed_bytes:,} of them the "
                          f"embeddings and norms); raise it to at least {smallest:,.0f}.")
    return fixed_bytes


@register
class Quant(Structure):
    name = "quant"
    options = QuantOptions
    allocators = BIT_ALLOCATORS

    def budget(self, options: "PlanOptions") -> Budget:
        return Budget.for_bits(options.avg_bits, options.max_bytes)

    def validate(self, method: str | None, allocator: str, budget: Budget, nm: str | None,
                 params: dict[str, Any]) -> tuple[str, str, str | None]:

        levels = parse_levels(params.get("bits", "4"), imatrix=bool(params.get("imatrix", False)))
        gguf = isinstance(levels, GGUFLevels)
        if gguf and method not in (None, "gguf"):
            raise BudgetError(f"GGUF types are quantized by llama.cpp's own quantizers; --method {method} does not "
                              "apply.")
        method = QUANTIZERS.canonical(method or ("gguf" if gguf else "rtn"))
        if method == "gguf" and not gguf:
            raise BudgetError("--method gguf needs GGUF types in --bits (e.g. q4_k,q6_k,q8_0).")
        allocator = BIT_ALLOCATORS.canonical(allocator)
        if nm is not None:
            raise BudgetError("--nm applies to unstructured sparsity, not to quantization.")
        if params.get("group_size") is not None and int(params["group_size"]) < 0:
            raise BudgetError(f"--group-size must be 0 (per channel) or a positive number of inputs "
                              f"(got {params['group_size']}).")
        if params.get("act_order") and method != "gptq":
            raise BudgetError("--act-order applies to the gptq method only.")
        if params.get("llamacpp_activations") and not gguf:
            raise BudgetError("--llamacpp-activations applies to GGUF types, whose activations llama.cpp rounds.")
        if gguf and params.get("awq"):
            raise BudgetError("--awq applies to layerwise's own grid, not to GGUF types.")
        if "embedding_type" in params:

            gguf_type(params["embedding_type"])
        check_params(BIT_ALLOCATORS.get(allocator), allocator, self.own(params)[1])
        return method, allocator, None

    def check_model(self, model: Any, allocator: str, budget: Budget, params: dict[str, Any], deploy: bool) -> None:

        options = self.own(params)[0]
        if options.get("awq"):  # its layout needs are the family's, known before any calibration

            check_awq_layout(get_adapter(model))
        if budget.max_bytes is not None or budget.avg_bits is not None:  # the floors follow from shapes and types
            context = BitContext(model, decoder_linears(model), str(options.get("bits", "4")).split(","),
                                 options.get("group_size", 128) or None, bool(options.get("symmetric", False)))
            check_floors(context, budget, options.get("embedding_type") or "q8_0")

    def plan(self, request: PlanRequest) -> Plan:
        """Let the bit allocator pick each decoder linear's level; one quantize action per linear."""

        options, params = self.own(request.params)
        group_size = options.get("group_size", 128) or None
        symmetric = bool(options.get("symmetric", False))
        linears = decoder_linears(request.loaded.model)
        context = BitContext(request.loaded.model, linears, str(options.get("bits", "4")).split(","), group_size,
                             symmetric, request.calibration, request.seed, bool(options.get("imatrix", False)),
                             bool(options.get("llamacpp_activations", False)))
        gguf = isinstance(context.levels, GGUFLevels)
        fixed_bytes = check_floors(context, request.budget, options.get("embedding_type", "q8_0"))
        if fixed_bytes is not None:
            params["max_bits"] = 8 * (request.budget.max_bytes - fixed_bytes)
        allocation = BIT_ALLOCATORS.get(request.allocator)(context, avg_bits=request.budget.avg_bits, **params)
        params.pop("max_bits", None)
        achieved = context.average_bits(allocation.bits)
        if request.budget.avg_bits is not None and achieved > request.budget.avg_bits + 1e-9:
            raise BudgetError(f"The {request.allocator} allocation averages {achieved:.4f} bits, over the budget "
                              f"{request.budget.avg_bits}.")
        linear_bytes = context.total_bits(allocation.bits) / 8
        if fixed_bytes is not None and linear_bytes + fixed_bytes > request.budget.max_bytes:
            raise BudgetError(f"The {request.allocator} allocation needs {linear_bytes + fixed_bytes:,.0f} bytes, "
                              f"over --max-bytes {request.budget.max_bytes:,}.")
        awq = bool(options.get("awq", False))
        # GPTQ goes in activation order unless told otherwise: on smollm2-135m plain GPTQ loses to RTN (RESULTS.md)
        act_order = request.method == "gptq" and bool(options.get("act_order", True))
        action_options = {"awq": awq, "act_order": act_order}
        actions = [context.levels.action(name, level, request.method, action_options)
                   for name, level in allocation.bits.items()]
        prediction = {"avg_bits": round(achieved, 6), "memory_saving_vs_16bit": round(1 - achieved / 16, 6),
                      "linear_bytes": int(round(linear_bytes))}
        if gguf:

            embedding_type = options.get("embedding_type", "q8_0")
            prediction["gguf_tensor_bytes"] = int(round(linear_bytes)) + non_linear_bytes(request.loaded.model,
                                                                                          embedding_type)
            prediction["embedding_type"] = embedding_type
        else:
            widths = {linear.in_features for linear in linears.values()}
            prediction["last_group_width"] = {str(w): [e - s for s, e in group_bounds(w, group_size)][-1]
                                              for w in sorted(widths)}
        details = {**allocation.details, "bits": {name: str(level) for name, level in allocation.bits.items()},
                   "levels": context.levels.describe(), "group_size": group_size, "symmetric": symmetric,
                   "awq": awq, "act_order": act_order,
                   "statistics": linear_statistics(context) if request.calibration is not None else None}
        return request.plan(actions, {**allocation.params, **options}, details, prediction)

    def metrics(self, plan: Plan, loaded: LoadedModel, dense_latency: dict | None,
                extra: dict[str, Any]) -> dict[str, Any]:
        """The average bit width, the quantized linears' measured bytes and their reduction against 16-bit
        storage, and, for searches, the per-episode curve."""

        if not any(action.op == "quantize" for action in plan.actions):
            return {}
        storage = quantized_storage(loaded.model)
        reduction = 1 - storage["quantized_bytes"] / (2 * storage["quantized_weights"])
        return {"avg_bits": plan.prediction.get("avg_bits"), **storage,
                "memory_reduction_vs_16bit": round(reduction, 6), "bits_curve": plan.details.get("curve")}

    def table_rows(self, record: dict[str, Any]) -> list[tuple[str, str, str]]:
        metrics, avg_bits = record["metrics"], record["plan"]["prediction"].get("avg_bits")
        if avg_bits is None:
            return []
        return [("average bits (decoder linears)", "", f"{avg_bits:.3f}"),
                ("quantized linears, stored MiB (vs 16-bit)", f"{2 * metrics['quantized_weights'] / 2**20:.1f}",
                 f"{metrics['quantized_bytes'] / 2**20:.1f} (-{metrics['memory_reduction_vs_16bit']:.1%})")]
