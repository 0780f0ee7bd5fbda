// E2B's volumes with the official `e2b` JS SDK against a real `sandboxd serve`: Volume.create, the
// file API (through E2B_VOLUME_API_URL, which startRuntime sets as a user would), a sandbox that
// mounts the volume and sees and changes the same files, and Volume.destroy.

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'

import { Sandbox, Volume } from 'e2b'

import { skipReason, startRuntime } from './runtime.mjs'

describe('volumes', { skip: skipReason }, () => {
  let runtime
  before(async () => {
    runtime = await startRuntime()
  })
  after(async () => {
    await runtime?.stop()
  })

  test('Volume.create, writeFile, a sandbox mounting it, readFile, destroy', async (t) => {
    const volume = await Volume.create(`js-${Date.now()}`)
    assert.ok((await Volume.list()).some((v) => v.volumeId === volume.volumeId))

    const written = await volume.writeFile('/shared/from-api.txt', 'written through the API')
    assert.equal(written.uid, 1000)
    assert.equal(await volume.readFile('/shared/from-api.txt'), 'written through the API')

    // Killed before the volume is destroyed (a mounted volume cannot be): after-hooks run in order.
    const sandbox = await Sandbox.create({ volumeMounts: { '/mnt/data': volume } })
    t.after(async () => {
      await sandbox.kill()
      await Volume.destroy(volume.volumeId)
    })
    const seen = await sandbox.commands.run(
      'cat /mnt/data/shared/from-api.txt && echo && echo made inside > /mnt/data/shared/from-sandbox.txt && stat -c %U /mnt/data/shared/from-sandbox.txt',
    )
    assert.deepEqual(seen.stdout.trim().split('\n'), ['written through the API', 'user'])
    assert.equal(await volume.readFile('/shared/from-sandbox.txt'), 'made inside\n')
    const entries = await volume.list('/shared')
    assert.deepEqual(entries.map((e) => e.name).sort(), ['from-api.txt', 'from-sandbox.txt'])
    assert.ok(entries.every((e) => e.uid === 1000))
  })
})
