#!lua
-- Settle the shelving grants of finished requests: a book the shelving service handed
-- to a lend request that no longer runs, and that the library does not hold under that
-- request, goes back to shelving. Run by every worker, now and then, over the grants
-- ledger; and at once by a worker that lost the race for a request it got grants for.
--
-- KEYS[1]  lend request stream ({NS}:lend-requests)
-- KEYS[2]  grants ledger ({NS}:grants): book -> context (lend request id)
-- KEYS[3]  books the library holds from shelving ({NS}:from-shelving): book -> context
-- KEYS[4]  shelving returns stream ({NS}:shelving:returns)
-- ARGV[1]  consumer group of the lend request stream
-- ARGV[2..] pairs: book, context (as read from the ledger)
--
-- A pair is settled only if the ledger still names that context for the book (else the
-- grant was settled meanwhile, or the book handed out anew) and the context's entry is
-- not pending in the group (nobody works on the request: it is finished, so nothing will
-- lend or store the book under it any more). Idempotent: giving back a book that shelving
-- no longer has for that context changes nothing there.
--
-- Returns {settled, given back}: how many pairs were settled, and how many of their
-- books went back to shelving (the others the library holds under that context).
--
-- Failure first: reads and checks before the first write, an XADD.

local MAX_MS = '18446744073709551615-'
local settled, back, contexts = {}, {}, {}
for k = 2, #ARGV, 2 do
  local book, context = ARGV[k], ARGV[k + 1]
  if redis.call('HGET', KEYS[2], book) == context
      and #redis.call('XPENDING', KEYS[1], ARGV[1], context, context, 1) == 0 then
    settled[#settled + 1] = book
    if redis.call('HGET', KEYS[3], book) ~= context then
      back[#back + 1] = book
      contexts[#contexts + 1] = context
    end
  end
end
if #back > 0 and redis.call('EXISTS', KEYS[4]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[4])
  for k = 1, #info, 2 do
    if info[k] == 'last-generated-id' and string.find(info[k + 1], MAX_MS, 1, true) == 1 then
      return redis.error_reply('STREAMFULL ' .. KEYS[4] .. ' has used up its entry IDs: no entry can be added')
    end
  end
end
if #back > 0 then
  redis.call('XADD', KEYS[4], '*', 'book_ids', table.concat(back, ','), 'context_ids', table.concat(contexts, ','))
end
if #settled > 0 then redis.call('HDEL', KEYS[2], unpack(settled)) end
return {#settled, #back}
