// E2B docs, "Read & write files" (docs/filesystem/read-write): the JS examples, unmodified apart from
// the assertions, with the official @e2b/code-interpreter package against a real `sandboxd serve`.
// (runCode is never called: our built-in template has no Jupyter; files/commands are the base SDK's.)

import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { after, before, describe, test } from 'node:test'

import { FileNotFoundError, Sandbox } from '@e2b/code-interpreter'

import { killAfter, skipReason, startRuntime } from './runtime.mjs'

describe('files: read & write (docs/filesystem/read-write)', { skip: skipReason }, () => {
  let runtime
  before(async () => {
    runtime = await startRuntime()
  })
  after(async () => {
    await runtime?.stop()
  })

  test('reading files: files.read(path)', async (t) => {
    const sandbox = killAfter(t, await Sandbox.create())
    // A file the sandbox itself made (as root, outside the user's home), read as the default user.
    await sandbox.commands.run('mkdir -p /path/to && printf "made inside\\n" > /path/to/file', { user: 'root' })

    const fileContent = await sandbox.files.read('/path/to/file')

    assert.equal(fileContent, 'made inside\n')
    await assert.rejects(sandbox.files.read('/path/to/missing'), FileNotFoundError)
  })

  test('writing single files: files.write(path, data)', async (t) => {
    const sandbox = killAfter(t, await Sandbox.create())

    const info = await sandbox.files.write('/path/to/file', 'file content')

    assert.equal(info.path, '/path/to/file')
    assert.equal(info.name, 'file')
    assert.equal(info.type, 'file')
    assert.equal(await sandbox.files.read('/path/to/file'), 'file content')
    // As on E2B: envd writes as root and hands the file (and the directories it made) to the user.
    const owners = await sandbox.commands.run('stat -c %U /path/to/file /path/to /path')
    assert.equal(owners.stdout, 'user\nuser\nuser\n')
    // Writing again overwrites.
    await sandbox.files.write('/path/to/file', 'new content')
    assert.equal(await sandbox.files.read('/path/to/file'), 'new content')
  })

  test('writing multiple files: files.write([{ path, data }, ...])', async (t) => {
    const sandbox = killAfter(t, await Sandbox.create())

    const infos = await sandbox.files.write([
      { path: '/path/to/a', data: 'file content' },
      { path: '/another/path/to/b', data: 'file content' },
    ])

    assert.deepEqual(infos.map((i) => [i.path, i.name, i.type]).sort(), [
      ['/another/path/to/b', 'b', 'file'],
      ['/path/to/a', 'a', 'file'],
    ])
    assert.equal(await sandbox.files.read('/path/to/a'), 'file content')
    assert.equal(await sandbox.files.read('/another/path/to/b'), 'file content')
    const r = await sandbox.commands.run('cat /path/to/a /another/path/to/b; stat -c %U /path/to/a /another/path/to/b')
    assert.equal(r.stdout, 'file contentfile contentuser\nuser\n')
  })

  test('binary data round-trips (bytes and blob formats; the download may be gzipped)', async (t) => {
    const sandbox = killAfter(t, await Sandbox.create())
    const data = randomBytes(300 * 1024)

    await sandbox.files.write('/home/user/data.bin', new Blob([data]))

    const bytes = await sandbox.files.read('/home/user/data.bin', { format: 'bytes' })
    assert.ok(Buffer.from(bytes).equals(data))
    const blob = await sandbox.files.read('/home/user/data.bin', { format: 'blob' })
    assert.ok(Buffer.from(await blob.arrayBuffer()).equals(data))
    const r = await sandbox.commands.run('stat -c %s /home/user/data.bin')
    assert.equal(r.stdout.trim(), String(data.length))
  })

  test('file & directory info: files.getInfo (docs/filesystem/info)', async (t) => {
    const sandbox = killAfter(t, await Sandbox.create())

    // Create a new file
    await sandbox.files.write('test_file.txt', 'Hello, world!')
    // Get information about the file
    const info = await sandbox.files.getInfo('test_file.txt')

    assert.equal(info.name, 'test_file.txt')
    assert.equal(info.type, 'file')
    assert.equal(info.path, '/home/user/test_file.txt')
    assert.equal(info.size, 13)
    assert.equal(info.mode, 0o644)
    assert.equal(info.permissions, '-rw-r--r--')
    assert.equal(info.owner, 'user')
    assert.equal(info.group, 'user')
    assert.ok(info.modifiedTime instanceof Date && Math.abs(info.modifiedTime.getTime() - Date.now()) < 60_000)

    // Create a new directory
    assert.equal(await sandbox.files.makeDir('test_dir'), true)
    // Get information about the directory
    const dir = await sandbox.files.getInfo('test_dir')

    assert.equal(dir.name, 'test_dir')
    assert.equal(dir.type, 'dir')
    assert.equal(dir.path, '/home/user/test_dir')
    assert.equal(dir.mode, 0o755)
    assert.equal(dir.permissions, 'drwxr-xr-x')
    assert.equal(dir.owner, 'user')
    assert.equal(await sandbox.files.makeDir('test_dir'), false) // exists already
    // The home also holds the skeleton's dotfiles (.bashrc, .profile), as on E2B.
    const listed = (await sandbox.files.list('/home/user')).map((e) => e.name).filter((n) => !n.startsWith('.'))
    assert.deepEqual(listed.sort(), ['test_dir', 'test_file.txt'])
  })

  test(
    'files written with metadata can be listed and inspected',
    async (t) => {
      const sandbox = killAfter(t, await Sandbox.create())

      const written = await sandbox.files.write('/home/user/tagged.txt', 'x', { metadata: { owner: 'me' } })
      assert.deepEqual(written.metadata, { owner: 'me' })

      assert.deepEqual((await sandbox.files.getInfo('/home/user/tagged.txt')).metadata, { owner: 'me' })
      const tagged = (await sandbox.files.list('/home/user')).filter((e) => e.name === 'tagged.txt')
      assert.deepEqual(tagged.map((e) => e.metadata), [{ owner: 'me' }])
    },
  )
})
