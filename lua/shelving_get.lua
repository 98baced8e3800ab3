-- Shelving service mock: hand out books to a context (a lend request id), idempotently.
--
-- KEYS[1]  shelving state hash ({NS}:shelving:state): book id -> context id
-- ARGV[1]  context id
-- ARGV[2..] book ids
--
-- Returns one code per book: 1 handed out to this context now, 2 already handed to
-- this same context (an idempotent repeat), 0 held by another context.
local codes = {}
for i = 2, #ARGV do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[1]) == 1 then
    codes[#codes + 1] = 1
  elseif redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[1] then
    codes[#codes + 1] = 2
  else
    codes[#codes + 1] = 0
  end
end
return codes
