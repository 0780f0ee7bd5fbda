// E2B docs, "Code interpreting" (runCode, charts, contexts, streaming): the JS examples with the
// official @e2b/code-interpreter package (pinned) against a real `sandboxd interpreter` and real
// kernels (the venv's), in the SDK's debug mode. interpreter-runtime.test.mjs runs the same examples
// through `sandboxd serve`.

import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { Sandbox } from '@e2b/code-interpreter'

import { runCodeExamples, startInterpreter } from './interpreter.mjs'

runCodeExamples('standalone', {
  skip: false,
  async start() {
    const interpreter = await startInterpreter()
    return {
      sandbox: await Sandbox.create(),
      cwd: interpreter.cwd,
      makeDir: async () => mkdtempSync(join(tmpdir(), 'sandboxd-ctx-')),
      stop: () => interpreter.stop(),
    }
  },
})
