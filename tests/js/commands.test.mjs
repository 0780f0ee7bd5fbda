// E2B docs, "Running commands in sandbox" (docs/commands, docs/commands/streaming,
// docs/commands/background): the JS examples with the official @e2b/code-interpreter package against
// a real `sandboxd serve`. (runCode is never called: our built-in template has no Jupyter.)

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'

import { CommandExitError, Sandbox } from '@e2b/code-interpreter'

import { killAfter, skipReason, sleep, startRuntime, waitFor } from './runtime.mjs'

describe('commands (docs/commands)', { skip: skipReason }, () => {
  let runtime
  before(async () => {
    runtime = await startRuntime()
  })
  after(async () => {
    await runtime?.stop()
  })

  test("commands.run('ls -l')", async (t) => {
    const sandbox = killAfter(t, await Sandbox.create())
    await sandbox.files.write('/home/user/listed.txt', 'x')

    const result = await sandbox.commands.run('ls -l')

    assert.equal(result.exitCode, 0)
    assert.equal(result.error, undefined)
    assert.equal(result.stderr, '')
    assert.match(result.stdout, /^total \d+\n/)
    assert.match(result.stdout, /-rw-r--r-- 1 user user\s+1 .* listed\.txt\n/)
  })

  test('streaming: onStdout and onStderr get output as it is produced', async (t) => {
    const sandbox = killAfter(t, await Sandbox.create())
    const stdout = []
    const stderr = []
    const started = Date.now()

    const result = await sandbox.commands.run('echo hello; sleep 1; echo world; echo oops >&2', {
      onStdout: (data) => {
        stdout.push([data, Date.now() - started])
      },
      onStderr: (data) => {
        stderr.push(data)
      },
    })
    const finished = Date.now() - started

    assert.deepEqual(
      stdout.map(([data]) => data),
      ['hello\n', 'world\n'],
    )
    assert.deepEqual(stderr, ['oops\n'])
    assert.ok(stdout[0][1] < finished - 500, `'hello' came at ${stdout[0][1]} ms, the command ended at ${finished} ms`)
    assert.equal(result.stdout, 'hello\nworld\n')
    assert.equal(result.stderr, 'oops\n')
    assert.equal(result.exitCode, 0)
  })

  test('background: run returns at once, the command streams and can be killed', async (t) => {
    const sandbox = killAfter(t, await Sandbox.create())
    const stdout = []

    // Start the command in the background
    const command = await sandbox.commands.run('echo hello; sleep 10; echo world', {
      background: true,
      onStdout: (data) => {
        stdout.push(data)
      },
    })

    assert.ok(command.pid > 0)
    await waitFor(() => stdout.includes('hello\n'), { what: "'hello' from the background command" })
    assert.ok((await sandbox.commands.list()).some((p) => p.pid === command.pid))

    // Kill the command
    assert.equal(await command.kill(), true)

    await assert.rejects(command.wait(), (err) => err instanceof CommandExitError && err.exitCode !== 0)
    await waitFor(async () => !(await sandbox.commands.list()).some((p) => p.pid === command.pid), {
      what: 'the killed command to disappear from commands.list()',
    })
    assert.deepEqual(stdout, ['hello\n'])
    assert.equal(await sandbox.commands.kill(command.pid), false) // already gone
  })

  test('a background command keeps running; wait() returns its result', async (t) => {
    const sandbox = killAfter(t, await Sandbox.create())
    const command = await sandbox.commands.run('sleep 0.5; echo done', { background: true })
    assert.equal(command.exitCode, undefined)
    const result = await command.wait()
    assert.equal(result.exitCode, 0)
    assert.equal(result.stdout, 'done\n')
    assert.equal(command.stdout, 'done\n')
  })

  test('a non-zero exit code rejects with CommandExitError', async (t) => {
    const sandbox = killAfter(t, await Sandbox.create())

    const err = await sandbox.commands.run('echo partial; echo boom >&2; exit 3').then(
      () => assert.fail('the command should have failed'),
      (e) => e,
    )

    assert.ok(err instanceof CommandExitError, `got ${err?.constructor?.name}: ${err}`)
    assert.equal(err.exitCode, 3)
    assert.equal(err.error, 'exit status 3')
    assert.equal(err.stdout, 'partial\n')
    assert.equal(err.stderr, 'boom\n')
  })

  test('user and cwd options', async (t) => {
    const sandbox = killAfter(t, await Sandbox.create())

    const r = await sandbox.commands.run('whoami; pwd')
    assert.equal(r.stdout, 'user\n/home/user\n')
    const root = await sandbox.commands.run('whoami; pwd', { user: 'root', cwd: '/tmp' })
    assert.equal(root.stdout, 'root\n/tmp\n')
  })

  test('timeoutMs ends a command that runs too long, and kills it', async (t) => {
    const sandbox = killAfter(t, await Sandbox.create())

    const started = Date.now()
    await assert.rejects(sandbox.commands.run('sleep 30', { timeoutMs: 1000 }))
    assert.ok(Date.now() - started < 10_000)
    await sleep(200)
    const left = await sandbox.commands.run('pgrep -x sleep || true')
    assert.equal(left.stdout, '', 'the timed-out command was killed')
  })

  test(
    'envs: sandbox-wide (Sandbox.create) and per command (commands.run)',
    async (t) => {
      const sandbox = killAfter(t, await Sandbox.create({ envs: { FROM_CREATE: 'c' } }))

      const r = await sandbox.commands.run('echo $FROM_CREATE $FROM_RUN', { envs: { FROM_RUN: 'r' } })

      assert.equal(r.stdout, 'c r\n')
    },
  )
})
