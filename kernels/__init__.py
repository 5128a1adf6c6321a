"""Triton kernels of resalign_fast, installed as the package `resalign_fast.kernels`.

One module per op, each with a launcher `<op>_triton(...)` that takes the same arguments as the
op's kernel in resalign_fast._C. Importing a module imports triton; the dispatchers in
resalign_fast.ops import them only when the Triton backend runs. On a machine without a GPU the
kernels run in Triton's interpreter when TRITON_INTERPRET=1 is set before triton is imported.
The modules import only torch, triton and each other (relative imports); what they need from
resalign_fast comes in as arguments.
"""

# Elements per program of the element-wise kernels. 1024 x 4 warps keeps loads 128-bit wide on
# GPUs and keeps the interpreter's per-program cost (about 1.8 ms on CPU, FACTS.md) rare.
BLOCK = 1024
