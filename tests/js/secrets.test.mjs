// E2B's secrets with the official JS SDK's `Secret` (create, getInfo by id and by name, list page by
// page, update, exists, destroy) against a real `sandboxd serve`; what the egress proxy does with a
// secret is tested from Python, in the network lab (tests/test_network_sdk.py).

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, describe, test } from 'node:test'

import { Secret, SecretNotFoundError } from 'e2b'

import { skipReason, startRuntime } from './runtime.mjs'

describe('secrets (Secret)', { skip: skipReason }, () => {
  let runtime
  before(async () => {
    runtime = await startRuntime()
  })
  after(async () => {
    await runtime?.stop()
  })

  test('create, getInfo, list, update, exists, destroy', async () => {
    const name = `JS-Key-${randomUUID().slice(0, 8)}`
    const created = await Secret.create(name, 'sk-js-1', { metadata: { from: 'js' } })
    assert.match(created.secretId, /^sec_/)
    assert.equal(created.name, name.toLowerCase())
    assert.equal(created.version, 1)
    assert.deepEqual(created.metadata, { from: 'js' })
    assert.ok(created.createdAt instanceof Date)
    assert.equal(created.value, undefined)

    assert.equal((await Secret.getInfo(name)).secretId, created.secretId)
    assert.equal((await Secret.getInfo(created.secretId)).name, name.toLowerCase())
    const updated = await Secret.update(name, 'sk-js-2')
    assert.equal(updated.version, 2)

    const others = []
    for (let i = 0; i < 3; i++) others.push((await Secret.create(`js-page-${randomUUID().slice(0, 8)}`, 'v')).secretId)
    const seen = []
    const paginator = Secret.list({ limit: 2 })
    while (paginator.hasNext) {
      const page = await paginator.nextItems()
      assert.ok(page.length <= 2)
      seen.push(...page.map((s) => s.secretId))
    }
    for (const id of [created.secretId, ...others]) assert.ok(seen.includes(id), `${id} not listed`)

    assert.equal(await Secret.exists(name), true)
    assert.equal(await Secret.destroy(created.secretId), true)
    assert.equal(await Secret.destroy(created.secretId), false)
    assert.equal(await Secret.exists(name), false)
    await assert.rejects(Secret.getInfo(name), SecretNotFoundError)
    await assert.rejects(Secret.create('bad{name}', 'v'), /not usable/)
    for (const id of others) await Secret.destroy(id)
  })
})
