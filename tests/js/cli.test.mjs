// The official `e2b` CLI (@e2b/cli, pinned in package.json), unmodified, as an operator's tool for
// `sandboxd serve`: list, info, logs, metrics, exec, pause, resume and kill, each run as the real binary
// against a real runtime, configured the way E2B's docs configure it (E2B_API_KEY, E2B_API_URL, and
// E2B_SANDBOX_URL for the commands that reach into a sandbox).

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'

import { Sandbox } from 'e2b'

import { e2bCli, skipReason, startRuntime } from './runtime.mjs'

const e2b = (...args) => e2bCli(args)

describe('the e2b CLI against sandboxd serve', { skip: skipReason }, () => {
  let runtime
  before(async () => {
    runtime = await startRuntime()
  })
  after(async () => {
    await runtime?.stop()
  })

  test('list, info, logs, metrics, exec, pause, resume, kill', async () => {
    const sbx = await Sandbox.create({ metadata: { via: 'cli-test' } })
    const id = sbx.sandboxId

    assert.match(await e2b('sandbox', 'list'), new RegExp(`${id}.*Running`))
    const info = await e2b('sandbox', 'info', id)
    assert.match(info, /State: running/)
    assert.match(info, /cli-test/)

    assert.match(await e2b('sandbox', 'exec', id, '--', 'sh', '-c', 'echo $((6 * 7))'), /^42$/m)

    const logs = await e2b('sandbox', 'logs', id)
    assert.match(logs, /INFO .*event: 'created'/)
    assert.match(logs, /logger: 'runtime'/)

    // The runtime sizes sandboxes from the host (1 core on a 2-core one): the CLI shows what it reports.
    const { cpuCount, memoryMB } = await Sandbox.getInfo(id)
    const metrics = await e2b('sandbox', 'metrics', id)
    assert.match(metrics, new RegExp(`CPU: +[\\d.]+% \\/ +${cpuCount} Core.* \\| Memory: +\\d+ \\/ ${memoryMB} +MiB`))

    assert.match(await e2b('sandbox', 'pause', id), /has been paused/)
    assert.equal((await Sandbox.getInfo(id)).state, 'paused')
    assert.match(await e2b('sandbox', 'list', '--state', 'paused'), new RegExp(id))
    assert.match(await e2b('sandbox', 'resume', id), /has been resumed/)
    assert.equal((await Sandbox.getInfo(id)).state, 'running')
    assert.match(await e2b('sandbox', 'logs', id), /event: 'resumed'/)

    assert.match(await e2b('sandbox', 'kill', id), /has been killed/)
    assert.doesNotMatch(await e2b('sandbox', 'list'), new RegExp(id))
  })

  // E2B docs, "List sandboxes" and "Shutdown sandboxes" (docs/cli/list-sandboxes,
  // docs/cli/shutdown-sandboxes): each flag the pages show.
  test('list --state, --metadata, --limit, --format; kill several, kill --all with filters', async () => {
    const tag = `docs-${process.pid}`
    const [a, b, c, d] = await Promise.all([
      Sandbox.create({ metadata: { key1: 'value1', key2: 'value2', tag } }),
      Sandbox.create({ metadata: { key1: 'value1', tag } }),
      Sandbox.create({ metadata: { key: 'value', tag } }),
      Sandbox.create({ metadata: { key: 'value', tag } }),
    ])
    await c.pause()
    const ids = (text) => JSON.parse(text).map((s) => s.sandboxId)

    const running = ids(await e2b('sandbox', 'list', '--format', 'json'))
    assert.ok([a, b, d].every((s) => running.includes(s.sandboxId)) && !running.includes(c.sandboxId))
    const both = ids(await e2b('sandbox', 'list', '--state', 'running,paused', '--format', 'json'))
    assert.ok([a, b, c, d].every((s) => both.includes(s.sandboxId)))
    assert.deepEqual(ids(await e2b('sandbox', 'list', '--metadata', 'key1=value1,key2=value2', '--format', 'json')), [
      a.sandboxId,
    ])
    assert.equal(ids(await e2b('sandbox', 'list', '--limit', '1', '--format', 'json')).length, 1)
    assert.match(await e2b('sandbox', 'list', '--format', 'pretty'), new RegExp(a.sandboxId))

    const killed = await e2b('sandbox', 'kill', a.sandboxId, b.sandboxId)
    assert.match(killed, new RegExp(`${a.sandboxId} has been killed`))
    assert.match(killed, new RegExp(`${b.sandboxId} has been killed`))
    // --all with a state and a metadata filter kills what matches: the paused one, not the running one.
    await e2b('sandbox', 'kill', '--all', '--state=paused', '--metadata=key=value')
    const left = ids(await e2b('sandbox', 'list', '--state', 'running,paused', '--format', 'json'))
    assert.ok(!left.includes(c.sandboxId) && left.includes(d.sandboxId), left)
    await e2b('sandbox', 'kill', '--all')
    assert.deepEqual(ids(await e2b('sandbox', 'list', '--state', 'running,paused', '--format', 'json')), [])
  })
})
