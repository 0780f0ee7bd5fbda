// E2B docs, "Sandbox lifecycle" (docs/sandbox): create with timeoutMs, setTimeout, getInfo and kill,
// with the official @e2b/code-interpreter package against a real `sandboxd serve`.

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'

import { Sandbox, SandboxNotFoundError } from '@e2b/code-interpreter'
import { Sandbox as BaseSandbox } from 'e2b'

import { killAfter, skipReason, startRuntime, waitFor } from './runtime.mjs'

const seconds = (info) => (info.endAt.getTime() - info.startedAt.getTime()) / 1000

describe('sandbox lifecycle (docs/sandbox)', { skip: skipReason }, () => {
  let runtime
  before(async () => {
    runtime = await startRuntime()
  })
  after(async () => {
    await runtime?.stop()
  })

  test('Sandbox.create({ timeoutMs: 60_000 })', async (t) => {
    // Create sandbox with and keep it running for 60 seconds.
    // 🚨 Note: The units are milliseconds.
    const sandbox = killAfter(
      t,
      await Sandbox.create({
        timeoutMs: 60_000,
      }),
    )

    assert.match(sandbox.sandboxId, /^[a-z0-9]{20}$/)
    assert.equal(await sandbox.isRunning(), true)
    const info = await sandbox.getInfo()
    assert.ok(Math.abs(seconds(info) - 60) <= 1, `lifetime ${seconds(info)} s`)
    // Without timeoutMs the sandbox lives E2B's default 5 minutes.
    const dflt = killAfter(t, await Sandbox.create())
    assert.ok(Math.abs(seconds(await dflt.getInfo()) - 300) <= 1)
  })

  test('sandbox.setTimeout(30_000): the new timeout counts from now', async (t) => {
    // Create sandbox with and keep it running for 60 seconds.
    const sandbox = killAfter(t, await Sandbox.create({ timeoutMs: 60_000 }))

    // Change the sandbox timeout to 30 seconds.
    // 🚨 The new timeout will be 30 seconds from now.
    const before = Date.now()
    await sandbox.setTimeout(30_000)

    const info = await sandbox.getInfo()
    const left = (info.endAt.getTime() - before) / 1000
    assert.ok(left > 28 && left < 32, `ends ${left} s after setTimeout`)
    // The static form does the same.
    await Sandbox.setTimeout(sandbox.sandboxId, 120_000)
    const later = (await Sandbox.getInfo(sandbox.sandboxId)).endAt.getTime() - Date.now()
    assert.ok(later > 115_000 && later <= 121_000, `ends in ${later} ms`)
  })

  test('sandbox.getInfo()', async (t) => {
    // Create sandbox with and keep it running for 60 seconds.
    const sandbox = killAfter(t, await Sandbox.create({ timeoutMs: 60_000 }))

    // Retrieve sandbox information.
    const info = await sandbox.getInfo()

    assert.equal(info.sandboxId, sandbox.sandboxId)
    // The code-interpreter package asks for the template `code-interpreter-v1`, one of sandboxd's own.
    assert.equal(info.templateId, 'code-interpreter-v1', JSON.stringify(info))
    assert.deepEqual(info.metadata, {})
    assert.equal(info.state, 'running')
    assert.ok(info.startedAt instanceof Date && !Number.isNaN(info.startedAt.getTime()))
    assert.ok(info.endAt > info.startedAt)
    assert.ok(Math.abs(info.startedAt.getTime() - Date.now()) < 10_000)
    assert.match(info.envdVersion, /^\d+\.\d+\.\d+$/)
    assert.ok(info.cpuCount > 0 && info.memoryMB > 0)
    assert.deepEqual(await Sandbox.getInfo(sandbox.sandboxId), await sandbox.getInfo())
  })

  test('sandbox.kill(): shut down at once', async () => {
    // Create sandbox with and keep it running for 60 seconds.
    const sandbox = await Sandbox.create({ timeoutMs: 60_000 })
    await sandbox.files.write('/home/user/x', 'x')

    // Shutdown the sandbox immediately.
    await sandbox.kill()

    assert.equal(await sandbox.isRunning(), false)
    await assert.rejects(sandbox.getInfo(), SandboxNotFoundError)
    await assert.rejects(Sandbox.connect(sandbox.sandboxId), SandboxNotFoundError)
    assert.equal(await Sandbox.kill(sandbox.sandboxId), false) // already gone: 404, which the SDK turns into false
    await assert.rejects(sandbox.files.read('/home/user/x'))
    const listed = await Sandbox.list().nextItems()
    assert.ok(!listed.some((s) => s.sandboxId === sandbox.sandboxId))
  })

  test('a sandbox whose timeout passes is shut down', async () => {
    const sandbox = await Sandbox.create({ timeoutMs: 2_000 })
    assert.equal(await sandbox.isRunning(), true)

    await waitFor(async () => !(await sandbox.isRunning()), { timeoutMs: 15_000, what: 'the sandbox to expire' })

    await assert.rejects(Sandbox.getInfo(sandbox.sandboxId), SandboxNotFoundError)
  })
  // On base (the e2b package's default template): snapshots work on any layered template.
  test('sandbox.createSnapshot(), Sandbox.create(snapshotId), sandbox.fork({ count: 2 })', async (t) => {
    const source = killAfter(t, await BaseSandbox.create())
    await source.files.write('/home/user/state.txt', 'snapshotted')
    const snapshot = await source.createSnapshot()
    assert.match(snapshot.snapshotId, /^[a-z0-9]{20}$/)
    const listed = await source.listSnapshots().nextItems()
    assert.deepEqual(
      listed.map((s) => s.snapshotId),
      [snapshot.snapshotId],
    )
    const copy = killAfter(t, await BaseSandbox.create(snapshot.snapshotId))
    assert.equal(await copy.files.read('/home/user/state.txt'), 'snapshotted')

    const forks = await source.fork({ count: 2, timeoutMs: 60_000 })
    assert.equal(forks.length, 2)
    for (const fork of forks) {
      assert.ok(fork instanceof BaseSandbox, String(fork))
      killAfter(t, fork)
      assert.equal(await fork.files.read('/home/user/state.txt'), 'snapshotted')
    }
    assert.equal(await source.isRunning(), true)
    await copy.kill()
    assert.equal(await BaseSandbox.deleteSnapshot(snapshot.snapshotId), true)
  })
})
