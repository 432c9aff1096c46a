// Side-by-side page: the base graph of one prompt on the left, its adapted graph on the right,
// each in circuit-tracer's own frontend (index.html?slug=...). URL: compare.html?prompt=<id>,
// or compare.html?base=<slug>&adapted=<slug> for any two graphs.
(async function () {
  'use strict'
  var ROLES = ['base', 'adapted']
  var SLUG_RE = /^(.*)--(base|adapted)$/  // viewer_slug() in em_circuits/viewer.py
  var params = new URLSearchParams(location.search)
  var select = document.getElementById('prompt-select')
  var promptText = document.getElementById('prompt-text')

  var prompts = groupByPrompt(await loadGraphs())
  var ids = Object.keys(prompts).sort()
  if (!ids.length) {
    promptText.textContent = 'No graphs in this viewer directory yet.'
    return
  }
  ids.forEach(function (id) {
    var option = document.createElement('option')
    option.value = id
    option.textContent = id + ' — ' + truncate(prompts[id].prompt, 100)
    select.appendChild(option)
  })
  select.addEventListener('change', function () { show(select.value, {}) })

  var explicit = {base: params.get('base'), adapted: params.get('adapted')}
  var first = params.get('prompt') || promptOfSlug(explicit.base || explicit.adapted) || ids[0]
  show(prompts[first] ? first : ids[0], explicit)
  setInterval(updateStatus, 500)

  async function loadGraphs() {
    var res = await fetch('./data/graph-metadata.json', {cache: 'no-store'})
    if (res.status === 404) return []
    if (!res.ok) throw new Error('graph-metadata.json: HTTP ' + res.status)
    return (await res.json()).graphs || []
  }

  // {prompt_id: {prompt, base: slug, adapted: slug}} from the metadata entries this viewer wrote;
  // other graphs in the directory (no role) are left to the frontend's own selector.
  function groupByPrompt(graphs) {
    var out = {}
    graphs.forEach(function (g) {
      var match = SLUG_RE.exec(g.slug)
      var id = g.prompt_id || (match && match[1])
      var role = g.role || (match && match[2])
      if (!id || ROLES.indexOf(role) < 0) return
      out[id] = out[id] || {prompt: g.prompt || ''}
      out[id][role] = g.slug
    })
    return out
  }

  function promptOfSlug(slug) {
    var match = slug && SLUG_RE.exec(slug)
    return match ? match[1] : null
  }

  function show(id, explicit) {
    select.value = id
    promptText.textContent = prompts[id].prompt
    promptText.title = prompts[id].prompt
    var query = {prompt: id}  // kept in the URL so a reload or a shared link shows the same
    ROLES.forEach(function (role) { if (explicit[role]) query[role] = explicit[role] })
    var url = new URL(location.href)
    url.search = new URLSearchParams(query).toString()
    history.replaceState(null, '', url)
    ROLES.forEach(function (role) {
      setPane(role, explicit[role] || prompts[id][role])
    })
  }

  function setPane(role, slug) {
    var pane = document.querySelector('.pane[data-role="' + role + '"]')
    var frame = pane.querySelector('iframe')
    var note = pane.querySelector('.missing')
    if (note) note.remove()
    if (!slug) {
      frame.hidden = true
      frame.removeAttribute('src')
      note = document.createElement('div')
      note.className = 'missing'
      note.textContent = 'No ' + role + ' graph for this prompt.'
      pane.appendChild(note)
      return
    }
    frame.hidden = false
    frame.src = 'index.html?slug=' + encodeURIComponent(slug)
  }

  // Node count and errors of each pane, shown in its header and kept in data-nodes /
  // data-errors (the frontend draws one svg text.node per graph node in its link graph).
  function updateStatus() {
    ROLES.forEach(function (role) {
      var pane = document.querySelector('.pane[data-role="' + role + '"]')
      var status = pane.querySelector('.status')
      var frame = pane.querySelector('iframe')
      var nodes = 0
      var errors = []
      var offline = []
      if (!frame.hidden && frame.contentDocument) {
        nodes = frame.contentDocument.querySelectorAll('.link-graph text.node').length
        errors = frame.contentWindow.__viewerErrors || []
        offline = frame.contentWindow.__viewerOffline || []
      }
      status.dataset.nodes = String(nodes)
      status.dataset.errors = errors.join('\n')
      status.classList.toggle('has-errors', errors.length > 0)
      status.title = errors.concat(offline).join('\n')
      var parts = frame.hidden ? [] : [nodes + ' nodes']
      if (errors.length) parts.push(errors.length + ' page error(s)')
      if (offline.length) parts.push('hosted feature examples unreachable')
      status.textContent = parts.join(', ')
    })
  }

  function truncate(text, n) {
    return text.length > n ? text.slice(0, n - 1) + '…' : text
  }
})()
