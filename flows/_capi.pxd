# C functions of CPython that the compiled modules (setup.py) call and Cython's own includes do
# not declare. Used only under `if cython.compiled:`; the plain-Python source never imports it.
cdef extern from "Python.h":
    void PyObject_GC_UnTrack(object o)

cdef extern from *:
    """
    static CYTHON_INLINE void freshrec_prefetch(const void* p) { __builtin_prefetch(p, 1); }
    """
    # Asks the CPU to fetch the cache line at `p` for writing, without waiting for it.
    void freshrec_prefetch(const void* p)
