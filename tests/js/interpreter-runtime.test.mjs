// E2B docs, "Code interpreting": the same runCode examples as interpreter.test.mjs, in a sandbox of a
// real `sandboxd serve` created as the docs do (`Sandbox.create()` from @e2b/code-interpreter: the
// template `code-interpreter-v1`), every call going through the runtime's proxy to the interpreter
// the sandbox started, with the template's kernels.

import assert from 'node:assert/strict'

import { Sandbox } from '@e2b/code-interpreter'

import { runCodeExamples } from './interpreter.mjs'
import { skipReason, startRuntime } from './runtime.mjs'

runCodeExamples('through sandboxd serve', {
  skip: skipReason,
  hasR: true,
  async start() {
    const runtime = await startRuntime()
    const sandbox = await Sandbox.create()
    assert.equal((await sandbox.getInfo()).templateId, 'code-interpreter-v1')
    let made = 0
    return {
      sandbox,
      cwd: '/home/user',
      makeDir: async () => {
        const dir = `/home/user/ctx-${made++}`
        await sandbox.files.makeDir(dir)
        return dir
      },
      stop: () => runtime.stop(),
    }
  },
})
