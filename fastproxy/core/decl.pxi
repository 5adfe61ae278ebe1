# Forward declarations: the parts refer to each other's cdef classes.
cdef class ResponseHead
cdef class CompiledRoute
cdef class Router
cdef class AccessLog
cdef class UpstreamConsumer
cdef class UpstreamPool
cdef class UpstreamConnection
cdef class Exchange


cdef class ClientConnection
cdef class WorkerCore
cdef class TlsListener
cdef class ClientSocket
