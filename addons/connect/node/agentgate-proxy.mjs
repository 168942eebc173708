// agentgate Node preload: make fetch honour HTTPS_PROXY / HTTP_PROXY / NO_PROXY and trust the
// gateway's CA, with no change to the agent's code.
//
//   (cd addons/connect/node && npm ci --omit=dev)         # once: installs the pinned undici
//   export NODE_OPTIONS="--import /abs/path/addons/connect/node/agentgate-proxy.mjs"
//
// Why: Node 18-22's built-in fetch (used by the official `openai` npm SDK and LangGraph JS)
// ignores the proxy variables, so an agent would go straight past the gateway. fetch takes its
// dispatcher from a process-wide slot that undici's setGlobalDispatcher fills; installing an
// EnvHttpProxyAgent there routes every fetch through the proxy. Node >= 24 does this itself
// with NODE_USE_ENV_PROXY=1 (then this file does nothing). Only fetch is covered: code that
// uses node:http / node:https directly (axios, got, ...) needs its own proxy agent.
import { readFileSync } from 'node:fs'
import { rootCertificates } from 'node:tls'
import process from 'node:process'

const TAG = 'agentgate-proxy'
const major = Number(process.versions.node.split('.')[0])
const proxy = process.env.https_proxy || process.env.HTTPS_PROXY ||
              process.env.http_proxy || process.env.HTTP_PROXY

if (major >= 24) {
  // Node's own env-proxy support is the right tool there; a second dispatcher from another
  // undici major would only add a way to break. Say so if it is off, but change nothing.
  if (proxy && process.env.NODE_USE_ENV_PROXY !== '1') {
    process.stderr.write(`${TAG}: Node ${process.versions.node} ignores HTTPS_PROXY unless ` +
                         'NODE_USE_ENV_PROXY=1 is set; this preload does nothing on Node >= 24\n')
  }
} else if (proxy) {
  // Imported only here, so that on Node >= 24 (or with no proxy set) nothing is loaded.
  const { EnvHttpProxyAgent, setGlobalDispatcher } = await import('undici')
  const emit = process.emitWarning
  // EnvHttpProxyAgent warns "experimental" on every start; the version is pinned and tested
  // here, so that one warning is dropped while the agent is built (all others pass through).
  process.emitWarning = (w, o, ...rest) =>
    (o && o.code === 'UNDICI-EHPA') ? undefined : emit.call(process, w, o, ...rest)
  try {
    setGlobalDispatcher(new EnvHttpProxyAgent(tlsOptions()))
  } finally {
    process.emitWarning = emit
  }
}

// The CA options for every leg undici opens: `requestTls` for TLS to the origin inside a
// CONNECT tunnel (the gateway terminates it with its own CA), `connect` for NO_PROXY hosts,
// `proxyTls` for an https:// proxy URL.
// Node already trusts NODE_EXTRA_CA_CERTS in its default TLS context, but it never reads
// SSL_CERT_FILE, and an explicit `ca` REPLACES the default roots; so when either variable is
// set, the list is spelled out in full: Node's bundled roots + every file named.
function tlsOptions () {
  const files = [process.env.NODE_EXTRA_CA_CERTS, process.env.SSL_CERT_FILE].filter(Boolean)
  if (files.length === 0) return {}
  const ca = [...rootCertificates]
  for (const file of files) {
    try {
      ca.push(readFileSync(file, 'utf8'))
    } catch (err) {
      // Fail closed and say why: an unreadable CA would only turn into opaque TLS errors later.
      throw new Error(`${TAG}: cannot read CA file ${file}: ${err.code || err.message}`)
    }
  }
  return { connect: { ca }, requestTls: { ca }, proxyTls: { ca } }
}
