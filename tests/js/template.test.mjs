// Template builds with the official JS SDK's `Template` builder and the official `e2b` CLI
// (`e2b template create` from a Dockerfile, `e2b template list`, `e2b template delete`), both unmodified, against a real
// `sandboxd serve`: the steps run in a build sandbox, and sandboxes created from the new template see
// their effect.

import assert from 'node:assert/strict'
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'

import { Sandbox, Template } from 'e2b'

import { e2bCli, skipReason, startRuntime } from './runtime.mjs'

const e2b = (cwd, ...args) => e2bCli(args, { cwd, timeoutMs: 120_000 })

const unique = (prefix) => `${prefix}-${process.pid}-${Math.floor(Math.random() * 1e9).toString(36)}`

describe('template builds against sandboxd serve', { skip: skipReason }, () => {
  let runtime
  let context
  before(async () => {
    runtime = await startRuntime()
    context = mkdtempSync(join(tmpdir(), 'sandboxd-js-template-'))
  })
  after(async () => {
    await runtime?.stop()
    if (context) rmSync(context, { recursive: true, force: true })
  })

  test('the JS SDK builds a template whose sandboxes see every step', async () => {
    mkdirSync(join(context, 'app'), { recursive: true })
    writeFileSync(join(context, 'app', 'main.txt'), 'from the JS build context\n')
    const name = unique('js-built')
    const template = Template({ fileContextPath: context })
      .fromTemplate('base')
      .runCmd(`echo ${name} > /opt/js-marker`, { user: 'root' })
      .copy('app', '/home/user/app')
      .setEnvs({ FROM_JS: 'yes' })
      .setWorkdir('/home/user/app')
    const logs = []
    await Template.build(template, name, { onBuildLogs: (entry) => logs.push(entry.message) })
    assert.ok(logs.some((line) => line.includes('[builder 1/4] RUN')), logs.join('\n'))
    assert.equal(await Template.exists(name), true)

    const sandbox = await Sandbox.create(name)
    try {
      const result = await sandbox.commands.run('cat /opt/js-marker main.txt; echo $FROM_JS; pwd; stat -c %U main.txt')
      assert.equal(result.stdout, `${name}\nfrom the JS build context\nyes\n/home/user/app\nuser\n`)
    } finally {
      await sandbox.kill()
    }
  })

  test('tags: name:tag builds and creates that build; assignTags, getTags, removeTags', async () => {
    const name = unique('js-tagged')
    const build = (value, target, options = {}) =>
      Template.build(Template().fromTemplate('base').runCmd(`echo ${value} > /home/user/which`), target, options)
    const which = async (target) => {
      const sandbox = await Sandbox.create(target)
      try {
        return (await sandbox.commands.run('cat /home/user/which')).stdout.trim()
      } finally {
        await sandbox.kill()
      }
    }
    const first = await build('one', `${name}:v1`)
    await build('two', name)
    assert.equal(await which(`${name}:v1`), 'one')
    assert.equal(await which(name), 'two')
    const assigned = await Template.assignTags(`${name}:v1`, ['stable'])
    assert.ok(first.buildId)
    assert.equal(assigned.buildId, first.buildId)
    assert.equal(await which(`${name}:stable`), 'one')
    await Template.removeTags(name, 'v1')
    const tags = (await Template.getTags(name)).map((t) => t.tag).sort()
    assert.deepEqual(tags, ['default', 'stable'])
    await assert.rejects(Sandbox.create(`${name}:v1`), /no tag or build 'v1'/)
  })

  test('e2b template create builds a Dockerfile; e2b template list shows it; e2b template delete forgets it', async () => {
    const dir = join(context, 'dockerfile')
    mkdirSync(dir, { recursive: true })
    writeFileSync(join(dir, 'greeting.txt'), 'hello from the Dockerfile context\n')
    const name = unique('cli-built')
    writeFileSync(
      join(dir, 'e2b.Dockerfile'),
      [
        'FROM debian:stable',
        `RUN echo ${name} > /opt/cli-marker`,
        'ENV CLI_ENV=set',
        'WORKDIR /srv/app',
        'COPY greeting.txt /srv/app/greeting.txt',
        '',
      ].join('\n'),
    )
    const output = await e2b(dir, 'template', 'create', name)
    assert.match(output, /\[builder 2\/7\] WORKDIR/)
    assert.match(output, new RegExp(`Building sandbox template ${name} finished`))

    const listed = await e2b(dir, 'template', 'list', '--format', 'json')
    const templates = JSON.parse(listed.slice(listed.indexOf('[')))
    assert.ok(
      templates.some((t) => t.names?.includes(name) || t.aliases?.includes(name)),
      listed,
    )
    assert.match(await e2b(dir, 'template', 'list'), new RegExp(name))

    const sandbox = await Sandbox.create(name)
    try {
      const result = await sandbox.commands.run('cat /opt/cli-marker /srv/app/greeting.txt; echo $CLI_ENV')
      assert.equal(result.stdout, `${name}\nhello from the Dockerfile context\nset\n`)
    } finally {
      await sandbox.kill()
    }

    const deleted = await e2b(dir, 'template', 'delete', name, '--yes')
    assert.match(deleted, new RegExp(name))
    assert.doesNotMatch(await e2b(dir, 'template', 'list'), new RegExp(name))
    assert.equal(await Template.exists(name), false)
    await assert.rejects(Sandbox.create(name), /not found/)
  })
})
