"""The precision names of graphs, engines and the PyTorch model, defined once for every command line and stage."""

CAST_PRECISIONS = ("fp16", "bf16")  # a strongly typed cast of the graph (graph/precision_cast.py)
QDQ_PRECISIONS = ("fp8", "int8", "int4")  # explicit Q/DQ nodes, calibrated (quant/ptq.py)
ALL_PRECISIONS = CAST_PRECISIONS + QDQ_PRECISIONS  # what --all-precisions builds from one export
PRECISIONS = ("fp32",) + ALL_PRECISIONS  # every engine precision

# the PyTorch model's modes (model/precision.py): fp32, autocast, a bf16/fp16 trunk with fp32 heads, or all bf16
TORCH_PRECISIONS = ("fp32", "tf32", "bf16-autocast", "fp16-autocast", "bf16", "fp16", "bf16-all")
# what vggt_to_trt.py --backend torch compiles into a <stem>_<precision>.torchcache artifact
TORCH_ENGINE_PRECISIONS = ("fp32", "bf16", "fp16", "bf16-all")
