// One aedes node of a cluster that shares its state (retained messages, sessions, wills) through Redis:
// `node broker.mjs PORT REDIS_PORT ID`. Prints "ready" once it listens on 127.0.0.1:PORT.
// Packages: see package.json (scripts/aedes-setup installs them and redis-server).
import { createServer } from 'node:net'
import { Aedes } from 'aedes'
import mqemitterRedis from 'mqemitter-redis'
import persistenceRedis from 'aedes-persistence-redis'

const [port, redisPort, id] = process.argv.slice(2)
const redis = { port: Number(redisPort), host: '127.0.0.1' }
const aedes = await Aedes.createBroker({ id, mq: mqemitterRedis(redis), persistence: persistenceRedis(redis) })
createServer(aedes.handle).listen(Number(port), '127.0.0.1', () => console.log('ready'))
