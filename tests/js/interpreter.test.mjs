// E2B docs, "Code interpreting" (runCode, charts, contexts, streaming): the JS examples with the
// official @e2b/code-interpreter package (pinned) against a real `sandboxd interpreter` and real
// kernels, in the SDK's debug mode.

import assert from 'node:assert/strict'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'

import { NotFoundError, Sandbox, TimeoutError } from '@e2b/code-interpreter'

import { startInterpreter } from './interpreter.mjs'

describe('runCode (docs/code-interpreting)', () => {
  let interpreter
  let sandbox
  before(async () => {
    interpreter = await startInterpreter()
    sandbox = await Sandbox.create()
  })
  after(async () => {
    await interpreter?.stop()
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
    const dir = mkdtempSync(join(tmpdir(), 'sandboxd-ctx-'))
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
    assert.deepEqual(execution.logs.stdout.join('').split('\n'), ['42', interpreter.cwd, ''])
  })
})
