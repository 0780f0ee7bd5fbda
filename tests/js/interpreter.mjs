// Starts a real `sandboxd interpreter` (E2B's code-interpreter API on a free loopback port) whose
// kernels are the venv's (ipykernel, bash_kernel, Deno), and points the official JS SDK at it in
// debug mode: E2B_DEBUG=true makes `Sandbox.create()` local, and the SDK sends its runCode and
// context requests to E2B_SANDBOX_URL when it is set (to localhost:49999 otherwise). And E2B's runCode
// examples as a suite, which interpreter.test.mjs runs against that server and
// interpreter-runtime.test.mjs against a sandbox of `sandboxd serve`.
//
// Not a test file itself (node --test only picks up *.test.mjs).

import assert from 'node:assert/strict'
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { after, before, describe, test } from 'node:test'

import { NotFoundError, TimeoutError } from '@e2b/code-interpreter'

import { freePort, python, startServer } from './runtime.mjs'

/** Kernelspecs for the venv's kernels, as a code-interpreter template installs its own. */
function writeKernelspecs(dir) {
  const py = python()
  const specs = {
    python3: ['python', [py, '-m', 'ipykernel_launcher', '-f', '{connection_file}']],
    bash: ['bash', [py, '-m', 'bash_kernel', '-f', '{connection_file}']],
    deno: ['typescript', [join(dirname(py), 'deno'), 'jupyter', '--kernel', '--conn', '{connection_file}']],
  }
  for (const [name, [language, argv]] of Object.entries(specs)) {
    mkdirSync(join(dir, name), { recursive: true })
    writeFileSync(join(dir, name, 'kernel.json'), JSON.stringify({ argv, display_name: name, language }))
  }
}

/**
 * Spawns the interpreter, waits for `GET /health` = 200 (its Python kernel is warm then) and points
 * the SDK at it. Returns `{ url, cwd, readLog, stop }`.
 */
export async function startInterpreter() {
  const port = await freePort()
  const url = `http://127.0.0.1:${port}`
  const base = mkdtempSync(join(tmpdir(), 'sandboxd-js-interp-'))
  const kernels = join(base, 'kernels')
  const cwd = join(base, 'home')
  const home = join(base, 'root')
  for (const dir of [kernels, cwd, home]) mkdirSync(dir, { recursive: true })
  writeKernelspecs(kernels)
  const log = join(base, 'interpreter.log')
  const server = await startServer({
    name: 'sandboxd interpreter',
    args: ['-m', 'sandboxd', 'interpreter', '--port', String(port), '--cwd', cwd, '--kernel-dir', kernels, '--envd-url', ''],
    log,
    url,
    timeoutMs: 120_000,
    env: { ...process.env, HOME: home },
  })
  const { child, exit, readLog } = server

  process.env.E2B_DEBUG = 'true'
  process.env.E2B_SANDBOX_URL = url
  delete process.env.E2B_API_URL

  async function stop() {
    if (!server.exited) {
      child.kill('SIGTERM')
      const timer = setTimeout(() => child.kill('SIGKILL'), 15_000)
      await exit
      clearTimeout(timer)
    }
    rmSync(base, { recursive: true, force: true })
  }

  return { url, cwd, readLog, stop }
}

/**
 * E2B's runCode examples (docs/code-interpreting) as one suite, against `target`: `{ skip, hasR, start() }`,
 * where `start()` gives `{ sandbox, cwd, makeDir(), stop() }` and `hasR` says the kernels include R's and Java's
 * (the template's do). One test file per target: node's --test-timeout bounds a whole file.
 */
export function runCodeExamples(name, target) {
  describe(`runCode (docs/code-interpreting), ${name}`, { skip: target.skip }, () => {
    let setup
    let sandbox
    before(async () => {
      setup = await target.start()
      sandbox = setup.sandbox
    })
    after(async () => {
      await setup?.stop()
    })

    test('state persists between calls', async () => {
      const first = await sandbox.runCode('js_state = 1')
      const second = await sandbox.runCode('js_state += 1; js_state')
      assert.equal(second.text, '2')
      assert.equal(second.results[0].isMainResult, true)
      assert.equal(second.executionCount, first.executionCount + 1)
    })

    test('a matplotlib chart comes back as PNG with chart data', async () => {
      const execution = await sandbox.runCode(`
import matplotlib.pyplot as plt
plt.bar(["a", "b", "c"], [3, 1, 2], label="counts")
plt.title("Bars")
plt.show()
`)
      assert.equal(execution.error, undefined)
      assert.equal(execution.results.length, 1)
      const [result] = execution.results
      assert.equal(result.isMainResult, false)
      assert.ok(Buffer.from(result.png, 'base64').subarray(0, 8).equals(Buffer.from('\x89PNG\r\n\x1a\n', 'latin1')))
      assert.equal(result.chart.type, 'bar')
      assert.equal(result.chart.title, 'Bars')
      assert.deepEqual(
        result.chart.elements.map((e) => [e.label, e.value]),
        [
          ['a', 3],
          ['b', 1],
          ['c', 2],
        ],
      )
      assert.deepEqual(result.formats(), ['png']) // the JS SDK lists neither text nor chart among formats
    })

    test('a DataFrame comes back as HTML and data', async () => {
      const execution = await sandbox.runCode('import pandas as pd\npd.DataFrame({"n": [1, 2], "s": ["x", "y"]})')
      const [result] = execution.results
      assert.deepEqual(result.data, { n: [1, 2], s: ['x', 'y'] })
      assert.match(result.html, /<table border="1" class="dataframe">/)
      assert.deepEqual(result.formats(), ['html', 'data'])
    })

    test('onStdout and onStderr receive output in order, as it happens', async () => {
      const events = []
      const started = Date.now()
      const execution = await sandbox.runCode(
        'import sys, time\nprint("one", flush=True)\ntime.sleep(0.5)\nprint("two", file=sys.stderr, flush=True)\ntime.sleep(0.5)\nprint("three")',
        {
          onStdout: (m) => events.push(['out', m.line, Date.now() - started]),
          onStderr: (m) => events.push(['err', m.line, Date.now() - started]),
        },
      )
      const total = Date.now() - started
      assert.deepEqual(
        events.map(([k, l]) => [k, l]),
        [
          ['out', 'one\n'],
          ['err', 'two\n'],
          ['out', 'three\n'],
        ],
      )
      assert.deepEqual(execution.logs, { stdout: ['one\n', 'three\n'], stderr: ['two\n'] })
      assert.ok(events[0][2] < total - 700, `first line at ${events[0][2]} ms of ${total} ms`)
    })

    test('an error has its name, value and traceback', async () => {
      const errors = []
      const execution = await sandbox.runCode('raise ValueError("bad value")', { onError: (e) => errors.push(e) })
      assert.equal(execution.error.name, 'ValueError')
      assert.equal(execution.error.value, 'bad value')
      assert.match(execution.error.traceback, /----> 1 raise ValueError\("bad value"\)/)
      assert.equal(errors.length, 1)
    })

    test('timeoutMs interrupts the cell and the context survives', async () => {
      await sandbox.runCode('kept = "yes"')
      const started = Date.now()
      await assert.rejects(sandbox.runCode('import time\ntime.sleep(60)', { timeoutMs: 2000 }), TimeoutError)
      assert.ok(Date.now() - started < 10_000)
      const again = Date.now()
      const execution = await sandbox.runCode('kept', { timeoutMs: 20_000 })
      assert.equal(execution.text, 'yes')
      assert.ok(Date.now() - again < 10_000, 'the next call waited for the interrupted cell')
    })

    test('contexts: own cwd and state, restart, remove', async () => {
      const dir = await setup.makeDir()
      await sandbox.runCode('only_in_default = 1')
      const context = await sandbox.createCodeContext({ cwd: dir })
      assert.equal(context.cwd, dir)
      assert.equal(context.language, 'python')
      assert.equal((await sandbox.runCode('import os; os.getcwd()', { context })).text, dir)
      const isolated = await sandbox.runCode('only_in_default', { context })
      assert.equal(isolated.error.name, 'NameError')

      const listed = await sandbox.listCodeContexts()
      assert.equal(listed.at(-1).id, context.id)
      assert.ok(listed.some((c) => c.language === 'javascript'))

      await sandbox.runCode('y = 5', { context })
      await sandbox.restartCodeContext(context)
      assert.equal((await sandbox.runCode('y', { context })).error.name, 'NameError')

      await sandbox.removeCodeContext(context)
      assert.ok(!(await sandbox.listCodeContexts()).some((c) => c.id === context.id))
      // The SDK leaves its request timer running when a call fails before the response starts (it would
      // keep node alive for the default 60 s): a short one here.
      await assert.rejects(sandbox.runCode('1', { context, requestTimeoutMs: 2000 }), NotFoundError)
    })

    test('envs apply to one call', async () => {
      const withEnv = await sandbox.runCode('import os; os.getenv("GREETING")', { envs: { GREETING: 'hi' } })
      const without = await sandbox.runCode('import os; os.getenv("GREETING", "unset")')
      assert.equal(withEnv.text, 'hi')
      assert.equal(without.text, 'unset')
    })

    test('JavaScript and TypeScript', async () => {
      const hello = await sandbox.runCode('console.log("Hello, World!")', { language: 'js' })
      assert.deepEqual(hello.logs.stdout, ['Hello, World!\n'])
      assert.equal((await sandbox.runCode('await Promise.resolve(6 * 7)', { language: 'js' })).text, '42')
      assert.equal((await sandbox.runCode("require('path').join('a', 'b')", { language: 'js' })).text, 'a/b')
      const ts = await sandbox.runCode('const n: number = 2; n * 21', { language: 'ts' })
      assert.equal(ts.text, '42')
      const env = await sandbox.runCode('process.env.WHO', { language: 'js', envs: { WHO: 'deno' } })
      assert.equal(env.text, 'deno')
    })

    test('bash', async () => {
      const execution = await sandbox.runCode('echo "$((6 * 7))"; pwd', { language: 'bash' })
      assert.deepEqual(execution.logs.stdout.join('').split('\n'), ['42', setup.cwd, ''])
    })

    test('R (docs/code-interpreting/supported-languages/r)', { skip: !target.hasR && 'no R kernel here' }, async () => {
      const hello = await sandbox.runCode('print("Hello, world!")', { language: 'r' })
      assert.deepEqual(hello.logs.stdout, ['[1] "Hello, world!"\n'])
      // IRkernel shows values as display data: a result that is not the main one (execution.text stays unset)
      const values = async (code, opts) => (await sandbox.runCode(code, opts)).results.map((r) => r.text)
      assert.deepEqual(await values('x <- 1:10; sum(x)', { language: 'r' }), ['[1] 55'])
      const context = await sandbox.createCodeContext({ language: 'r' })
      await sandbox.runCode('kept <- 41', { context })
      assert.deepEqual(await values('kept + 1', { context }), ['[1] 42'])
      const failed = await sandbox.runCode('stop("nope")', { language: 'r' })
      assert.match(failed.error.value, /nope/)
    })

    test('Java (docs/code-interpreting/supported-languages/java)', { skip: !target.hasR && 'no Java kernel here' }, async () => {
      // A sandbox of its own, created as the docs do: this suite's has many kernels running by now,
      // and a Java kernel (two JVMs, ~270 MiB) more can pass its memory limit.
      const own = await sandbox.constructor.create()
      try {
        const hello = await own.runCode('System.out.println("Hello, world!");', { language: 'java', timeoutMs: 120_000 })
        assert.deepEqual(hello.logs.stdout, ['Hello, world!\n'])
        const value = await own.runCode('int x = 40 + 2; x', { language: 'java' })
        assert.equal(value.text, '42')
        const failed = await own.runCode('throw new RuntimeException("nope");', { language: 'java' })
        assert.equal(failed.error.name, 'RuntimeException')
        assert.match(failed.error.value, /nope/)
      } finally {
        await own.kill()
      }
    })
  })
}
