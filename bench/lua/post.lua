-- POST a fixed 64 KiB body on every request.
wrk.method = "POST"
wrk.body = string.rep("p", 65536)
wrk.headers["Content-Type"] = "application/octet-stream"
