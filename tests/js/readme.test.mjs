// The README's JavaScript example runs, unmodified, against a real `sandboxd serve`.

import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { readFileSync, rmSync, writeFileSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'

import { skipReason, startRuntime } from './runtime.mjs'

const HERE = dirname(fileURLToPath(import.meta.url))
const README = resolve(HERE, '..', '..', 'README.md')

describe('README', { skip: skipReason }, () => {
  let runtime
  before(async () => {
    runtime = await startRuntime()
  })
  after(async () => {
    await runtime?.stop()
  })

  test('the JavaScript quick-start example runs', async () => {
    const blocks = [...readFileSync(README, 'utf8').matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1])
    assert.ok(blocks.length > 0, 'the README has no JavaScript example')
    for (const [i, block] of blocks.entries()) {
      // Written beside this file so that its imports resolve to tests/js/node_modules.
      const script = join(HERE, `.readme-example-${process.pid}-${i}.mjs`)
      writeFileSync(script, block)
      try {
        const { stdout } = await promisify(execFile)(process.execPath, [script], { env: process.env, timeout: 60_000 })
        assert.match(stdout, /hello from sandboxd/)
        assert.match(stdout, /^42$/m)
      } finally {
        rmSync(script, { force: true })
      }
    }
  })
})
