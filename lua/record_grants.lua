-- Record the books the shelving service handed to a lend request.
--
-- KEYS[1]  request stream ({NS}:lend-requests)
-- KEYS[2]  this request's reservation set ({NS}:reservations:<request_id>)
-- KEYS[3]  shelving returns stream ({NS}:shelving:returns)
-- ARGV[1]  consumer group
-- ARGV[2]  request entry id
-- ARGV[3]  N, how many of the books below were newly handed out by this call
-- ARGV[4..3+N]  books newly handed out
-- ARGV[4+N..]   books the shelving service already held for this request (a retry)
--
-- Returns 1 when recorded in the reservation, 0 when the entry is no longer pending.
-- In that case another worker has finished the request, so the newly handed-out books
-- belong to nobody and go straight back to shelving. Books the shelving service already
-- held for this request were seen by whoever finished it and are left alone: they may
-- be lent, in storage or reserved by another request by now.
local new = tonumber(ARGV[3])
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then
  if new > 0 then
    redis.call('XADD', KEYS[3], '*', 'book_ids', table.concat(ARGV, ',', 4, 3 + new))
  end
  return 0
end
if #ARGV > 3 then
  redis.call('SADD', KEYS[2], unpack(ARGV, 4))
end
return 1
