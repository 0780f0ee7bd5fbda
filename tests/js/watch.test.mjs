// E2B docs, "Watch sandbox directory for changes" (docs/filesystem/watch): the JS examples with the
// official @e2b/code-interpreter package against a real `sandboxd serve`. The JS SDK watches over the
// server-streaming Connect RPC filesystem.Filesystem/WatchDir (the Python SDK polls instead).

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'

import { FilesystemEventType, Sandbox } from '@e2b/code-interpreter'

import { killAfter, skipReason, sleep, startRuntime, waitFor } from './runtime.mjs'

describe('files: watch directory (docs/filesystem/watch)', { skip: skipReason }, () => {
  let runtime
  before(async () => {
    runtime = await startRuntime()
  })
  after(async () => {
    await runtime?.stop()
  })

  test('watchDir(dirname, onEvent): a write is reported', async (t) => {
    const sandbox = killAfter(t, await Sandbox.create())
    const dirname = '/home/user'
    const events = []
    const wrote = []

    // Start watching directory for changes
    const handle = await sandbox.files.watchDir(dirname, async (event) => {
      events.push(event)
      if (event.type === FilesystemEventType.WRITE) {
        wrote.push(event.name)
      }
    })
    t.after(() => handle.stop())

    // Trigger file write event
    await sandbox.files.write(`${dirname}/my-file`, 'hello')

    await waitFor(() => wrote.includes('my-file'), { what: 'a WRITE event for my-file' })
    assert.ok(events.some((e) => e.name === 'my-file' && e.type === FilesystemEventType.CREATE))

    // Not recursive: a change one level down is not reported.
    await sandbox.commands.run(`mkdir -p ${dirname}/sub`)
    await sleep(200)
    events.length = 0
    await sandbox.files.write(`${dirname}/sub/deeper`, 'x')
    await sandbox.files.write(`${dirname}/marker`, 'x')
    await waitFor(() => events.some((e) => e.name === 'marker'), { what: 'an event for marker' })
    assert.deepEqual(
      events.filter((e) => e.name.includes('deeper')),
      [],
    )

    // After stop() no more events arrive.
    await handle.stop()
    events.length = 0
    await sandbox.files.write(`${dirname}/after-stop`, 'x')
    await sleep(300)
    assert.deepEqual(events, [])
  })

  test('watchDir(dirname, onEvent, { recursive: true }): changes in new subfolders are reported', async (t) => {
    const sandbox = killAfter(t, await Sandbox.create())
    const dirname = '/home/user'
    const events = []

    // Start watching directory for changes
    const handle = await sandbox.files.watchDir(
      dirname,
      async (event) => {
        events.push(event)
      },
      {
        recursive: true,
      },
    )
    t.after(() => handle.stop())

    // Trigger file write event (my-folder does not exist yet: the write creates it)
    await sandbox.files.write(`${dirname}/my-folder/my-file`, 'hello')

    await waitFor(() => events.some((e) => e.name === 'my-folder/my-file'), {
      what: 'an event for my-folder/my-file',
    })
    assert.ok(events.some((e) => e.name === 'my-folder' && e.type === FilesystemEventType.CREATE))

    // Once the folder exists, writes inside it are WRITE events named relative to the watched dir.
    events.length = 0
    await sandbox.files.write(`${dirname}/my-folder/my-file`, 'hello again')
    await waitFor(
      () => events.some((e) => e.name === 'my-folder/my-file' && e.type === FilesystemEventType.WRITE),
      { what: 'a WRITE event for my-folder/my-file' },
    )
    // Removal and rename are reported too.
    await sandbox.files.rename(`${dirname}/my-folder/my-file`, `${dirname}/my-folder/renamed`)
    await sandbox.files.remove(`${dirname}/my-folder/renamed`)
    await waitFor(
      () =>
        events.some((e) => e.name === 'my-folder/my-file' && e.type === FilesystemEventType.RENAME) &&
        events.some((e) => e.name === 'my-folder/renamed' && e.type === FilesystemEventType.REMOVE),
      { what: 'RENAME and REMOVE events' },
    )
  })

  test('the seed recursive example, 20 times in a row: the new file is always CREATE, CHMOD, WRITE', async (t) => {
    // issue 12 item 1: the upload creates my-folder and commits my-file in one request; the watcher
    // must report the file as envd does for a new file, not only find it in the new folder's scan.
    const sandbox = killAfter(t, await Sandbox.create())
    const dirname = '/home/user'
    for (let run = 0; run < 20; run++) {
      const events = []
      const handle = await sandbox.files.watchDir(dirname, async (event) => events.push(event), { recursive: true })
      await sandbox.files.write(`${dirname}/my-folder/my-file`, 'hello')
      await waitFor(
        () => events.some((e) => e.name === 'my-folder/my-file' && e.type === FilesystemEventType.WRITE),
        { timeoutMs: 5_000, what: `run ${run}: a WRITE event for my-folder/my-file` },
      )
      await handle.stop()
      assert.deepEqual(
        events.filter((e) => e.name === 'my-folder/my-file').map((e) => e.type),
        [FilesystemEventType.CREATE, FilesystemEventType.CHMOD, FilesystemEventType.WRITE],
        `run ${run}`,
      )
      assert.ok(events.some((e) => e.name === 'my-folder' && e.type === FilesystemEventType.CREATE), `run ${run}`)
      await sandbox.files.remove(`${dirname}/my-folder`)
    }
  })
})
