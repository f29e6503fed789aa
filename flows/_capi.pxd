# C functions of CPython that the compiled modules (setup.py) call and Cython's own includes do
# not declare. Used only under `if cython.compiled:`; the plain-Python source never imports it.
cdef extern from "Python.h":
    void PyObject_GC_UnTrack(object o)
