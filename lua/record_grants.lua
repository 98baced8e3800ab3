-- Record the books the shelving service handed to a lend request.
--
-- KEYS[1]  request stream ({NS}:lend-requests)
-- KEYS[2]  this request's reservation set ({NS}:reservations:<request_id>)
-- KEYS[3]  shelving returns stream ({NS}:shelving:returns)
-- KEYS[4]  books the library took from shelving ({NS}:from-shelving): book -> context
-- ARGV[1]  consumer group
-- ARGV[2]  request entry id (the shelving context)
-- ARGV[3]  N, how many of the books below this caller's shelving call handed out anew
-- ARGV[4..3+N]  books handed out anew to this caller
-- ARGV[4+N..]   books the shelving service already held for this request (a retry)
--
-- Returns 1 when recorded: the books join the reservation and the library's record of
-- what it took from shelving. Returns 0 when the entry is no longer pending: another
-- worker finished the request. Then a book handed out anew to this caller belongs to
-- nobody unless the finishing worker saw it (as "already held") and took it: if the
-- library has no record of taking it, it goes straight back to shelving. Books that
-- were already held are left alone: whoever got them first answers for them.
local new = tonumber(ARGV[3])
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then
  local back, contexts = {}, {}
  for i = 4, 3 + new do
    if redis.call('HEXISTS', KEYS[4], ARGV[i]) == 0 then
      back[#back + 1] = ARGV[i]
      contexts[#contexts + 1] = ARGV[2]
    end
  end
  if #back > 0 then
    redis.call('XADD', KEYS[3], '*', 'book_ids', table.concat(back, ','), 'context_ids', table.concat(contexts, ','))
  end
  return 0
end
if #ARGV > 3 then
  local taken = {}
  for i = 4, #ARGV do
    taken[#taken + 1] = ARGV[i]
    taken[#taken + 1] = ARGV[2]
  end
  redis.call('SADD', KEYS[2], unpack(ARGV, 4))
  redis.call('HSET', KEYS[4], unpack(taken))
end
return 1
