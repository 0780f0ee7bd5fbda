// E2B docs, "Sandbox metadata" (docs/sandbox/metadata), "List sandboxes" (docs/sandbox/list) and
// "Connect to running sandbox" (docs/sandbox/connect): the JS examples with the official
// @e2b/code-interpreter package against a real `sandboxd serve` (its own, so the listings hold only
// what these tests made; each test still filters by a tag of its own).

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, describe, test } from 'node:test'

import { Sandbox, SandboxNotFoundError } from '@e2b/code-interpreter'

import { killAfter, skipReason, startRuntime } from './runtime.mjs'

const ids = (sandboxes) => sandboxes.map((s) => s.sandboxId).sort()

describe('metadata, listing and connecting (docs/sandbox/metadata, list, connect)', { skip: skipReason }, () => {
  let runtime
  before(async () => {
    runtime = await startRuntime()
  })
  after(async () => {
    await runtime?.stop()
  })

  test('metadata: set at create, read back from Sandbox.list()', async (t) => {
    // Create sandbox with metadata.
    const sandbox = killAfter(
      t,
      await Sandbox.create({
        metadata: {
          userId: '123',
        },
      }),
    )

    // List running sandboxes and access metadata.
    const paginator = await Sandbox.list()
    const runningSandboxes = await paginator.nextItems()

    const ours = runningSandboxes.find((s) => s.sandboxId === sandbox.sandboxId)
    assert.deepEqual(ours.metadata, { userId: '123' })
    assert.deepEqual((await sandbox.getInfo()).metadata, { userId: '123' })
  })

  test('listing sandboxes: Sandbox.list() pages, SandboxInfo fields', async (t) => {
    const sandbox = killAfter(
      t,
      await Sandbox.create({
        metadata: {
          name: 'My Sandbox',
        },
      }),
    )

    const paginator = Sandbox.list()

    // Get the first page of sandboxes (running and paused)
    const firstPage = await paginator.nextItems()

    const runningSandbox = firstPage.find((s) => s.sandboxId === sandbox.sandboxId)
    assert.deepEqual(runningSandbox.metadata, { name: 'My Sandbox' })
    assert.ok([runningSandbox.templateId, runningSandbox.name].includes('code-interpreter-v1'))
    assert.equal(runningSandbox.state, 'running')
    assert.ok(runningSandbox.startedAt instanceof Date && runningSandbox.startedAt.getTime() <= Date.now())
    assert.ok(runningSandbox.endAt > runningSandbox.startedAt)

    // Get the next page of sandboxes: there is none (one page holds up to 100), and the SDK says so.
    assert.equal(paginator.hasNext, false)
    assert.equal(paginator.nextToken, undefined)
    await assert.rejects(paginator.nextItems(), /No more items to fetch/)
  })

  test("filtering by state: ['running'], ['paused'], ['running', 'paused']", async (t) => {
    const tag = randomUUID()
    const running = killAfter(t, await Sandbox.create({ metadata: { tag } }))
    const paused = killAfter(t, await Sandbox.create({ metadata: { tag } }))
    assert.equal(await paused.pause(), true)

    const list = async (state) => Sandbox.list({ query: { state, metadata: { tag } } }).nextItems()

    // List sandboxes that are running or paused.
    const paginator = Sandbox.list({
      query: {
        state: ['running', 'paused'],
      },
    })
    const sandboxes = await paginator.nextItems()

    assert.deepEqual(ids(sandboxes.filter((s) => s.metadata.tag === tag)), ids([running, paused]))
    assert.deepEqual(ids(await list(['running'])), [running.sandboxId])
    assert.deepEqual(ids(await list(['paused'])), [paused.sandboxId])
    assert.equal((await list(['paused']))[0].state, 'paused')
    // No state filter: running and paused.
    assert.deepEqual(ids(await Sandbox.list({ query: { metadata: { tag } } }).nextItems()), ids([running, paused]))
  })

  test('filtering by metadata: every given pair must match', async (t) => {
    // Create sandbox with metadata.
    const sandbox = killAfter(
      t,
      await Sandbox.create({
        metadata: {
          env: 'dev',
          app: 'my-app',
          userId: '123',
        },
      }),
    )
    killAfter(t, await Sandbox.create({ metadata: { env: 'prod', app: 'my-app', userId: '123' } }))
    killAfter(t, await Sandbox.create({ metadata: { env: 'dev', app: 'my-app', userId: '456' } }))

    // List all sandboxes that has `userId` key with value `123` and `env` key with value `dev`.
    const paginator = Sandbox.list({
      query: {
        metadata: { userId: '123', env: 'dev' },
      },
    })

    const sandboxes = await paginator.nextItems()
    assert.deepEqual(ids(sandboxes), [sandbox.sandboxId])
    assert.equal((await Sandbox.list({ query: { metadata: { app: 'my-app' } } }).nextItems()).length, 3)
    assert.deepEqual(await Sandbox.list({ query: { metadata: { userId: '789' } } }).nextItems(), [])
  })

  test('filtering by metadata with characters URLs escape (the SDK double-encodes the filter)', async (t) => {
    const metadata = { 'a key & more': 'v w=x/y?z%', 'ünïcode': 'é 😀', plain: randomUUID() }
    const sandbox = killAfter(t, await Sandbox.create({ metadata }))
    killAfter(t, await Sandbox.create({ metadata: { ...metadata, 'a key & more': 'v w' } }))

    const found = await Sandbox.list({ query: { metadata } }).nextItems()

    assert.deepEqual(ids(found), [sandbox.sandboxId])
    assert.deepEqual(found[0].metadata, metadata)
  })

  test('advanced pagination: limit, nextToken, hasNext and looping over every page', async (t) => {
    const tag = randomUUID()
    const made = []
    for (let i = 0; i < 5; i++) made.push(killAfter(t, await Sandbox.create({ metadata: { tag, n: String(i) } })))

    const paginator = Sandbox.list({ limit: 2, query: { metadata: { tag } } })
    assert.equal(paginator.hasNext, true) // before the first page is fetched

    // Loop through all pages
    const sandboxes = []
    const tokens = []
    while (paginator.hasNext) {
      const items = await paginator.nextItems()
      assert.ok(items.length <= 2)
      sandboxes.push(...items)
      tokens.push(paginator.nextToken)
    }

    assert.equal(tokens.length, 3)
    assert.equal(tokens.at(-1), undefined)
    assert.ok(tokens.slice(0, -1).every((token) => typeof token === 'string' && token.length > 0))
    assert.deepEqual(ids(sandboxes), ids(made))
    // Sorted by start time, newest first (E2B's default order).
    assert.deepEqual(
      sandboxes.map((s) => s.metadata.n),
      ['4', '3', '2', '1', '0'],
    )

    // Start paginating from a token, as the docs' `Sandbox.list({ limit, nextToken })` example does.
    const resumed = Sandbox.list({ limit: 100, nextToken: tokens[0], query: { metadata: { tag } } })
    assert.equal(resumed.nextToken, tokens[0])
    assert.deepEqual(
      (await resumed.nextItems()).map((s) => s.metadata.n),
      ['2', '1', '0'],
    )
    assert.equal(resumed.hasNext, false)
  })

  test('connect: find a running sandbox with Sandbox.list(), then Sandbox.connect(sandboxId)', async (t) => {
    const sbx = killAfter(t, await Sandbox.create())
    await sbx.files.write('/home/user/left-here.txt', 'from the first connection')

    // Get all running sandboxes
    const paginator = await Sandbox.list({
      query: { state: ['running'] },
    })

    const runningSandboxes = await paginator.nextItems()
    if (runningSandboxes.length === 0) {
      throw new Error('No running sandboxes found')
    }

    // Get the ID of the sandbox you want to connect to
    const sandboxId = runningSandboxes.find((s) => s.sandboxId === sbx.sandboxId).sandboxId

    const sandbox = await Sandbox.connect(sandboxId)

    // Now you can use the sandbox as usual
    const result = await sandbox.commands.run('whoami')
    assert.equal(`Running in sandbox ${sandbox.sandboxId} as "${result.stdout.trim()}"`, `Running in sandbox ${sbx.sandboxId} as "user"`)
    assert.equal(await sandbox.files.read('/home/user/left-here.txt'), 'from the first connection')
    // Connecting with timeoutMs sets the sandbox's timeout, like setTimeout.
    await Sandbox.connect(sandboxId, { timeoutMs: 600_000 })
    const left = (await sandbox.getInfo()).endAt.getTime() - Date.now()
    assert.ok(left > 590_000 && left <= 601_000, `ends in ${left} ms`)
    await assert.rejects(Sandbox.connect('doesnotexist00000000'), SandboxNotFoundError)
  })

  test('connect resumes a paused sandbox with its files and processes', async (t) => {
    const sbx = killAfter(t, await Sandbox.create())
    await sbx.files.write('/home/user/state.txt', 'before pause')
    const sleeper = await sbx.commands.run('sleep 300', { background: true, timeoutMs: 0 })
    assert.equal(await sbx.pause(), true)
    assert.equal(await sbx.pause(), false) // already paused: 409, which the SDK turns into false
    assert.equal((await sbx.getInfo()).state, 'paused')
    assert.equal(await sbx.isRunning(), false)

    const sandbox = await Sandbox.connect(sbx.sandboxId)

    assert.equal((await sandbox.getInfo()).state, 'running')
    assert.equal(await sandbox.files.read('/home/user/state.txt'), 'before pause')
    assert.ok((await sandbox.commands.list()).some((p) => p.pid === sleeper.pid))
  })
})
