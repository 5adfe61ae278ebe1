-- Every 10th request of a wrk thread asks to close its connection: wrk reconnects after it,
-- so a connection carries 10 requests on average.
local sent = 0
local keep = wrk.format()
local last = wrk.format(nil, nil, {["Connection"] = "close"})
request = function()
   sent = sent + 1
   if sent % 10 == 0 then
      return last
   end
   return keep
end
