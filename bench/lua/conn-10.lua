-- Every 10th request of a wrk thread asks to close its connection: wrk reconnects after it,
-- so a connection carries 10 requests on average. The requests are built in init(), once
-- wrk has set the host they go to (built at load time, they would have no Host header).
local sent = 0
local keep, last
init = function(args)
   keep = wrk.format()
   last = wrk.format(nil, nil, {["Connection"] = "close"})
end
request = function()
   sent = sent + 1
   if sent % 10 == 0 then
      return last
   end
   return keep
end
