// The official `e2b` CLI (@e2b/cli, pinned in package.json), unmodified, as an operator's tool for
// `sandboxd serve`: list, info, logs, metrics, exec, pause, resume and kill, each run as the real binary
// against a real runtime, configured the way E2B's docs configure it (E2B_API_KEY, E2B_API_URL, and
// E2B_SANDBOX_URL for the commands that reach into a sandbox).

import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { dirname, join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { fileURLToPath } from 'node:url'

import { Sandbox } from 'e2b'

import { skipReason, startRuntime } from './runtime.mjs'

const HERE = dirname(fileURLToPath(import.meta.url))
const CLI = join(HERE, 'node_modules', '.bin', 'e2b')

/** Runs `e2b <args>` (stdin closed, as in CI) and returns its output without colours; throws if it fails. */
function e2b(...args) {
  return new Promise((resolve, reject) => {
    const child = spawn(CLI, args, {
      env: { ...process.env, NO_COLOR: '1', FORCE_COLOR: '0', NO_UPDATE_NOTIFIER: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: 60_000,
    })
    let output = ''
    child.stdout.on('data', (d) => (output += d))
    child.stderr.on('data', (d) => (output += d))
    child.on('error', reject)
    child.on('close', (code) => {
      const text = output.replace(/\u001b\[[0-9;]*m/g, '')
      if (code === 0) resolve(text)
      else reject(new Error(`e2b ${args.join(' ')} exited with ${code}:\n${text}`))
    })
  })
}

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
})
