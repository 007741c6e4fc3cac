"""``vitscale plan``'s table: a :class:`vitscale.bench.plan.Plan` printed for people (the numbers are plan.py's)."""
from __future__ import annotations

from vitscale.bench.common import GB, print_table
from vitscale.bench.plan import CPU_RUNTIME_BYTES, Plan


def print_plan(plan: Plan, grad_ckpt_configured: bool) -> None:
    # GB for real models; MB (2^20 bytes) when even the largest figure is below 1 GB (CPU test models)
    big = max(max(r.total, r.total_ckpt, r.cpu_per_node) for r in plan.rows) >= GB
    unit, scale = ("GB", GB) if big else ("MB", 2 ** 20)

    def f(n: int) -> str:
        return f"{n / scale:.2f}"

    unit_name = "CPU process" if plan.device == "cpu" else "GPU"
    print(f"vitscale plan: {plan.model}, {plan.params / 1e6:.2f}M params ({plan.trainable / 1e6:.2f}M trainable), "
          f"{plan.world_size} {unit_name}(s) ({plan.gpus_per_node}/node), batch {plan.batch}/{unit_name} at "
          f"{plan.img_size}px, {plan.precision}; {unit_name} {plan.gpu_mem_gb:g} GB, reserve {plan.reserve_gb:g} GB")
    if plan.device == "cpu":
        print(f"a rehearsal's CPU processes: resident memory a process, its runtime ({CPU_RUNTIME_BYTES / GB:.2f} GB) "
              "in 'buffers' and the unfused AdamW step's temporaries counted")
    print(f"DeepSpeed gradient bucket: {plan.bucket_elems:.3g} elements x {2 if plan.overlap_comm else 1} "
          f"(overlap_comm={plan.overlap_comm}); figures in {unit} = 2^{30 if big else 20} bytes per GPU")
    ck = "ckpt" if plan.ckpt_blocks == plan.blocks else f"ckpt{plan.ckpt_blocks}"  # partial: blocks recomputed
    headers = ["option", "params", "grads", "optim", "buffers", "activ", "total", "fits", f"activ+{ck}",
               f"total+{ck}", "fits", "CPU/node"]
    rows = []
    for r in plan.rows:
        mark = "*" if r.current else " "
        rows.append([mark + r.option, f(r.params), f(r.grads), f(r.optimizer), f(r.buffers), f(r.activations),
                     f(r.total), "yes" if r.fits else "NO", f(r.activations_ckpt), f(r.total_ckpt),
                     "yes" if r.fits_ckpt else "NO", f(r.cpu_per_node)])
    print_table(headers, rows)
    ckpt = "off" if not grad_ckpt_configured else (
        "on" if plan.ckpt_blocks == plan.blocks else f"the first {plan.ckpt_blocks} of {plan.blocks} blocks")
    states = ("the ZeRO paper's 2+2+12 bytes/param (bf16/fp16)" if plan.precision in ("bf16", "fp16") else
              "4+4+8 bytes/param (fp32: params, grads, Adam moments; +4 from ZeRO-1 on, DeepSpeed's fp32 partition)")
    print(f"* = the config's engine setting (model.grad_checkpointing is {ckpt}). Model states use {states} "
          f"divided by the {'CPU processes' if plan.device == 'cpu' else 'GPUs'} per stage; see docs/benchmarks.md.")
    for note in plan.notes:
        print(f"note: {note}")
