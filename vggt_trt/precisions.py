"""The precision names of graphs and engines, defined once for the converter, the quantiser and the builder."""

CAST_PRECISIONS = ("fp16", "bf16")  # a strongly typed cast of the graph (graph/precision_cast.py)
QDQ_PRECISIONS = ("fp8", "int8", "int4")  # explicit Q/DQ nodes, calibrated (quant/ptq.py)
ALL_PRECISIONS = CAST_PRECISIONS + QDQ_PRECISIONS  # what --all-precisions builds from one export
PRECISIONS = ("fp32",) + ALL_PRECISIONS  # every engine precision
