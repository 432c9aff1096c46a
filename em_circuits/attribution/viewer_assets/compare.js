// Side-by-side page: the base graph of one prompt on the left, its adapted graph on the right,
// each in circuit-tracer's own frontend (index.html?slug=...), plus what the analysis adds:
// a list of its top features (click one to select it in both panes), a diff mode colouring
// each feature node by its base-vs-adapted category, and selection kept in sync between the
// panes. URL (deep links): compare.html?prompt=<id>&feature=<layer>:<feature>&node=<node id>
// &diff=1; compare.html?base=<slug>&adapted=<slug> for any two graphs.
(async function () {
  'use strict'
  var ROLES = ['base', 'adapted']
  var SLUG_RE = /^(.*)--(base|adapted)$/  // viewer_slug() in em_circuits/attribution/viewer.py
  // Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
  var CATEGORY_COLOURS = {
    gained: '#009E73',
    lost: '#D55E00',
    strengthened: '#E69F00',
    weakened: '#56B4E9',
    unchanged: '#BBBBBB',
  }
  // Fits circuit-tracer's page into a pane: its own graph selector is this page's prompt
  // selector, and its controls wrap instead of widening the page.
  var EMBED_CSS = [
    '.nav { flex-wrap: wrap; gap: 6px; }',
    '.nav .controls-container { flex-wrap: wrap; min-width: 0; }',
    '.nav select.graph-prompt-select { display: none; }',
    '.header-top-row { min-width: 0; overflow: hidden; }',
    '.feature-title, .pp-clerp { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }',
    '.em-diff circle { pointer-events: none; }',
    '.em-adapter rect { pointer-events: none; }',
  ].join('\n')
  // Adapter nodes (the LoRA's own writes, node type "lora adapter"): a reddish-purple
  // diamond behind each, so they read as their own kind of node next to the features.
  var ADAPTER_TYPE = 'lora adapter'
  var ADAPTER_COLOUR = '#CC79A7'

  var params = new URLSearchParams(location.search)
  var select = document.getElementById('prompt-select')
  var promptText = document.getElementById('prompt-text')
  var diffToggle = document.getElementById('diff-toggle')
  var topList = document.getElementById('top-features')
  var state = document.getElementById('viewer-state')
  var featureNote = document.getElementById('feature-note')

  var analysis = await loadJson('./data/analysis.json')
  var prompts = groupByPrompt(((await loadJson('./data/graph-metadata.json')) || {}).graphs || [])
  var ids = Object.keys(prompts).sort()
  var graphs = {}  // role -> {slug, data: graph JSON} of the prompt shown
  var selected = null  // {layer, feature} selected in both panes
  var lastClicked = {}  // role -> clickedId last seen in that pane's URL
  var pending = {}  // role -> node to select there once its graph is drawn

  setUpLegend()
  diffToggle.checked = params.get('diff') === '1'
  diffToggle.addEventListener('change', function () { updateUrl(); paintAll() })
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
  select.addEventListener('change', function () { show(select.value, {}, null, null) })

  var explicit = {base: params.get('base'), adapted: params.get('adapted')}
  var linked = parseFeature(params.get('feature'))
  var first = params.get('prompt') || promptOfSlug(explicit.base || explicit.adapted) ||
    (linked && await firstPromptDrawing(linked)) || ids[0]
  await show(prompts[first] ? first : ids[0], explicit, linked, params.get('node'))
  setInterval(tick, 400)

  async function loadJson(path) {
    var res = await fetch(path, {cache: 'no-store'})
    if (res.status === 404) return null
    if (!res.ok) throw new Error(path + ': HTTP ' + res.status)
    return res.json()
  }

  // {prompt_id: {prompt, base: slug, adapted: slug}} from the metadata entries this viewer wrote;
  // other graphs in the directory (no role) are left to the frontend's own selector.
  function groupByPrompt(entries) {
    var out = {}
    entries.forEach(function (g) {
      var match = SLUG_RE.exec(g.slug)
      var id = g.prompt_id || (match && match[1])
      var role = g.role || (match && match[2])
      if (!id || ROLES.indexOf(role) < 0) return
      out[id] = out[id] || {prompt: g.prompt || ''}
      out[id][role] = g.slug
    })
    return out
  }

  // A link to a feature without a prompt (the report's) opens the first prompt whose
  // graphs draw that feature.
  async function firstPromptDrawing(f, skip) {
    for (var i = 0; i < ids.length; i++) {
      if (ids[i] === skip) continue
      for (var r = 0; r < ROLES.length; r++) {
        var slug = prompts[ids[i]][ROLES[r]]
        if (slug && nodeOfFeature(await loadJson('./graph_data/' + slug + '.json'), f, null)) {
          return ids[i]
        }
      }
    }
    return null
  }

  function promptOfSlug(slug) {
    var match = slug && SLUG_RE.exec(slug)
    return match ? match[1] : null
  }

  function parseFeature(text) {
    var match = /^(\d+):(\d+)$/.exec(text || '')
    return match ? {layer: +match[1], feature: +match[2]} : null
  }

  // "3_1234_17" (circuit-tracer's node_id: layer, feature, position) -> {layer, feature, pos}
  function featureOfNode(nodeId) {
    var match = /^(\d+)_(\d+)_(\d+)$/.exec(nodeId || '')
    return match ? {layer: +match[1], feature: +match[2], pos: +match[3]} : null
  }

  function isFeatureNode(data, nodeId) {
    return !!data && data.nodes.some(function (n) {
      return n.node_id === nodeId && n.feature_type === 'cross layer transcoder'
    })
  }

  function featureKey(f) { return f ? f.layer + ':' + f.feature : '' }

  // The node of feature f to select in a graph: at position pos if drawn there, else its
  // most influential node (circuit-tracer's influence: lower is more influential).
  function nodeOfFeature(data, f, pos) {
    if (!data || !f) return null
    var prefix = f.layer + '_' + f.feature + '_'
    var nodes = data.nodes.filter(function (n) { return n.node_id.indexOf(prefix) === 0 })
    if (!nodes.length) return null
    var same = nodes.filter(function (n) { return n.ctx_idx === pos })
    if (same.length) return same[0].node_id
    nodes.sort(function (a, b) { return (a.influence || 0) - (b.influence || 0) })
    return nodes[0].node_id
  }

  async function show(id, explicit, feature, nodeId) {
    select.value = id
    promptText.textContent = prompts[id].prompt
    promptText.title = prompts[id].prompt
    graphs = {}
    await Promise.all(ROLES.map(async function (role) {
      var slug = explicit[role] || prompts[id][role]
      graphs[role] = {slug: slug, data: slug ? await loadJson('./graph_data/' + slug + '.json') : null}
    }))
    // A feature opens selected in both panes; a node opens selected in the pane that draws
    // it, and the other pane follows as it would after a click there.
    selected = nodeId ? null : feature
    lastClicked = {}
    pending = {}
    var owner = ROLES.slice().reverse().find(function (role) {
      var data = graphs[role].data
      return nodeId && data && data.nodes.some(function (n) { return n.node_id === nodeId })
    })
    ROLES.forEach(function (role) {
      var data = graphs[role].data
      var clicked = null
      if (role === owner) {
        clicked = nodeId
      } else if (selected) {
        clicked = nodeOfFeature(data, selected, null)
      }
      setPane(role, graphs[role].slug, clicked)
    })
    updateUrl()
    renderTopList()
    await noteUndrawn(selected)
  }

  // A feature asked for (a report's link, a click in the top list) that a graph of this
  // prompt does not draw (pruned away, or not active here) is said so in the page, with a
  // prompt that draws it; otherwise the panes would just show nothing selected.
  async function noteUndrawn(f) {
    var missing = !f ? [] : ROLES.filter(function (role) {
      return graphs[role] && graphs[role].data && !nodeOfFeature(graphs[role].data, f, null)
    })
    featureNote.textContent = ''
    featureNote.hidden = !missing.length
    if (!missing.length) return
    var name = featureName(f)
    var where = missing.length === ROLES.length ? 'this prompt\'s graphs'
      : 'the ' + missing[0] + ' graph of this prompt'
    featureNote.append(name + ' is not drawn in ' + where +
      ' (below the graph\'s pruning threshold, or not active on this prompt).')
    var other = await firstPromptDrawing(f, select.value)
    if (featureKey(selected) !== featureKey(f)) return  // the selection moved on meanwhile
    if (other) {
      var link = document.createElement('a')
      link.href = '?' + new URLSearchParams({prompt: other, feature: featureKey(f)})
      link.textContent = 'prompt ' + other + ' draws it'
      featureNote.append(' ', link, '.')
    } else {
      featureNote.append(' No prompt in this viewer draws it.')
    }
  }

  function featureName(f) {
    var top = analysis && (analysis.top_features || []).find(function (t) {
      return featureKey(t) === featureKey(f)
    })
    return top && top.name ? top.name : 'L' + f.layer + ' #' + f.feature
  }

  function updateUrl() {
    var query = {prompt: select.value}  // kept in the URL so a reload or a shared link shows the same
    ROLES.forEach(function (role) { if (explicit[role]) query[role] = explicit[role] })
    if (selected) query.feature = featureKey(selected)
    if (diffToggle.checked) query.diff = '1'
    var url = new URL(location.href)
    url.search = new URLSearchParams(query).toString()
    history.replaceState(null, '', url)
  }

  function pane(role) { return document.querySelector('.pane[data-role="' + role + '"]') }

  function setPane(role, slug, clickedId) {
    var section = pane(role)
    var frame = section.querySelector('iframe')
    var note = section.querySelector('.missing')
    if (note) note.remove()
    if (!slug) {
      frame.hidden = true
      frame.removeAttribute('src')
      note = document.createElement('div')
      note.className = 'missing'
      note.textContent = 'No ' + role + ' graph for this prompt.'
      section.appendChild(note)
      return
    }
    frame.hidden = false
    var query = 'slug=' + encodeURIComponent(slug)
    if (clickedId) query += '&clickedId=' + encodeURIComponent(clickedId)
    frame.src = 'index.html?' + query
  }

  function frameDoc(role) {
    var frame = pane(role).querySelector('iframe')
    return frame.hidden ? null : frame.contentDocument
  }

  function drawnNodes(doc) {
    return doc ? Array.prototype.slice.call(doc.querySelectorAll('.link-graph text.node')) : []
  }

  // Selects a node in a pane as a click on it would (the frontend finds the nearest node to
  // the pointer), so its own panels update; false when the node is not drawn.
  function clickNode(role, nodeId) {
    var el = drawnNodes(frameDoc(role)).find(function (e) {
      return e.__data__ && e.__data__.nodeId === nodeId
    })
    if (!el) return false
    var box = el.getBoundingClientRect()
    var view = el.ownerDocument.defaultView
    el.dispatchEvent(new view.MouseEvent('click', {
      bubbles: true, cancelable: true, view: view,
      clientX: box.left + box.width / 2, clientY: box.top + box.height / 2,
    }))
    return true
  }

  function clickedIn(role) {
    var frame = pane(role).querySelector('iframe')
    if (frame.hidden || !frame.contentWindow) return null
    try {
      return new URL(frame.contentWindow.location.href).searchParams.get('clickedId')
    } catch (err) {
      return null
    }
  }

  // One feature selected in both panes: a click on a feature in one pane selects the same
  // feature (same position if drawn there) in the other.
  function syncSelection() {
    ROLES.forEach(function (role) {
      var now = clickedIn(role)
      if (now === lastClicked[role]) return
      lastClicked[role] = now
      var f = isFeatureNode(graphs[role] && graphs[role].data, now) ? featureOfNode(now) : null
      if (!f || featureKey(f) === featureKey(selected)) return
      selected = {layer: f.layer, feature: f.feature}
      updateUrl()
      renderTopList()
      noteUndrawn(selected)
      ROLES.forEach(function (other) {
        if (other === role) return
        var target = nodeOfFeature(graphs[other] && graphs[other].data, selected, f.pos)
        if (target && target !== clickedIn(other)) pending[other] = target
      })
    })
    ROLES.forEach(function (role) {
      if (pending[role] && clickNode(role, pending[role])) {
        lastClicked[role] = pending[role]  // our own selection: nothing to sync back
        delete pending[role]
      }
    })
  }

  function selectFeature(f) {
    selected = f
    updateUrl()
    renderTopList()
    noteUndrawn(f)
    ROLES.forEach(function (role) {
      var target = nodeOfFeature(graphs[role] && graphs[role].data, f, null)
      if (target && target !== clickedIn(role)) pending[role] = target
    })
    syncSelection()
  }

  function categoryOf(nodeId) {
    var f = featureOfNode(nodeId)
    var entry = f && analysis && analysis.categories[featureKey(f)]
    return entry ? entry.category : null
  }

  // Diff mode: a coloured disc behind each feature node whose base-vs-adapted category the
  // analysis found; kept in its own layer so the frontend's colouring of nodes stays as is.
  function paint(role) {
    var doc = frameDoc(role)
    var nodes = drawnNodes(doc)
    if (!nodes.length) return 0
    var svg = nodes[0].parentNode
    var layer = svg.querySelector('g.em-diff')
    if (!diffToggle.checked || !analysis) {
      if (layer) layer.remove()
      nodes.forEach(function (n) { n.removeAttribute('data-category') })
      return 0
    }
    if (layer && +layer.dataset.nodes === nodes.length) {
      return layer.childElementCount
    }
    if (layer) layer.remove()
    layer = doc.createElementNS('http://www.w3.org/2000/svg', 'g')
    layer.setAttribute('class', 'em-diff')
    layer.dataset.nodes = String(nodes.length)
    nodes.forEach(function (n) {
      var d = n.__data__
      var category = d && d.feature_type === 'cross layer transcoder' && categoryOf(d.nodeId)
      if (!category || !CATEGORY_COLOURS[category]) return
      n.setAttribute('data-category', category)
      var disc = doc.createElementNS('http://www.w3.org/2000/svg', 'circle')
      disc.setAttribute('r', '7')
      disc.setAttribute('transform', n.getAttribute('transform') || '')
      disc.setAttribute('fill', CATEGORY_COLOURS[category])
      disc.setAttribute('fill-opacity', '0.6')
      disc.setAttribute('data-category', category)
      layer.appendChild(disc)
    })
    svg.insertBefore(layer, svg.firstChild)
    return layer.childElementCount
  }

  function paintAll() { ROLES.forEach(paint) }

  // Marks the adapter nodes of a pane in a layer of its own; returns how many are drawn.
  function markAdapter(role) {
    var doc = frameDoc(role)
    var nodes = drawnNodes(doc).filter(function (n) {
      return n.__data__ && n.__data__.feature_type === ADAPTER_TYPE
    })
    var all = drawnNodes(doc)
    if (!all.length) return 0
    var svg = all[0].parentNode
    var layer = svg.querySelector('g.em-adapter')
    var key = nodes.map(function (n) { return n.getAttribute('transform') }).join(';')
    if (layer && layer.dataset.key === key) return layer.childElementCount
    if (layer) layer.remove()
    if (!nodes.length) return 0
    layer = doc.createElementNS('http://www.w3.org/2000/svg', 'g')
    layer.setAttribute('class', 'em-adapter')
    layer.dataset.key = key
    nodes.forEach(function (n) {
      var mark = doc.createElementNS('http://www.w3.org/2000/svg', 'rect')
      mark.setAttribute('x', '-6')
      mark.setAttribute('y', '-6')
      mark.setAttribute('width', '12')
      mark.setAttribute('height', '12')
      mark.setAttribute('transform', (n.getAttribute('transform') || '') + ' rotate(45)')
      mark.setAttribute('fill', ADAPTER_COLOUR)
      mark.setAttribute('fill-opacity', '0.8')
      mark.setAttribute('data-node', n.__data__.nodeId)
      layer.appendChild(mark)
    })
    svg.insertBefore(layer, svg.firstChild)
    return layer.childElementCount
  }

  function embed(role) {
    var doc = frameDoc(role)
    if (!doc || !doc.head || doc.getElementById('em-embed')) return
    var style = doc.createElement('style')
    style.id = 'em-embed'
    style.textContent = EMBED_CSS
    doc.head.appendChild(style)
  }

  function setUpLegend() {
    var legend = document.getElementById('diff-legend')
    Object.keys(CATEGORY_COLOURS).forEach(function (name) {
      var item = document.createElement('span')
      item.className = 'swatch'
      item.innerHTML = '<i style="background:' + CATEGORY_COLOURS[name] + '"></i>' + name
      legend.appendChild(item)
    })
  }

  function renderTopList() {
    topList.innerHTML = ''
    var heading = document.createElement('h3')
    topList.appendChild(heading)
    if (!analysis || !analysis.top_features || !analysis.top_features.length) {
      heading.textContent = 'Top features'
      var none = document.createElement('p')
      none.className = 'note'
      none.textContent = 'No analysis yet: run `em-circuits analyze`.'
      topList.appendChild(none)
      return
    }
    var list = analysis.top_features
    heading.textContent = 'Top features (' + list.length + ' of ' + analysis.top_features_of + ')'
    var sub = document.createElement('p')
    sub.className = 'note'
    sub.textContent = 'By mean total effect on the evil−safe contrast (discovery prompts); ' +
      '◆ = tested causally. Click to select in both graphs.'
    topList.appendChild(sub)
    list.forEach(function (f) {
      var drawn = ROLES.filter(function (role) {
        return nodeOfFeature(graphs[role] && graphs[role].data, f, null)
      })
      var button = document.createElement('button')
      button.type = 'button'
      button.className = 'top-feature'
      button.dataset.feature = featureKey(f)
      button.dataset.drawn = drawn.join(' ')
      if (featureKey(f) === featureKey(selected)) button.classList.add('selected')
      if (!drawn.length) button.classList.add('absent')
      var colour = CATEGORY_COLOURS[f.category] || 'transparent'
      button.innerHTML = '<span class="rank">' + f.rank + '</span>' +
        '<span class="name"></span>' +
        '<span class="effect">' + (f.mean_total >= 0 ? '+' : '') + f.mean_total.toPrecision(2) + '</span>' +
        '<i class="chip" style="background:' + colour + '"></i>'
      button.querySelector('.name').textContent =
        (f.tested ? '◆ ' : '') + f.name + (f.label ? ' — ' + f.label : '')
      button.title = f.name + (f.label ? ': ' + f.label : '') +
        '\ncategory (base vs adapted): ' + (f.category || 'not compared') +
        '\nin ' + f.n_prompts + ' discovery prompts' +
        (drawn.length ? '\ndrawn in: ' + drawn.join(', ') : '\nnot drawn in this prompt\'s graphs')
      button.addEventListener('click', function () { selectFeature(f) })
      topList.appendChild(button)
    })
  }

  // Node count, errors, diff discs, selection and layout of each pane, shown in its header
  // and kept as data- attributes (read by the browser test).
  function tick() {
    syncSelection()
    var widest = document.documentElement.scrollWidth - document.documentElement.clientWidth
    ROLES.forEach(function (role) {
      embed(role)
      var section = pane(role)
      var status = section.querySelector('.status')
      var frame = section.querySelector('iframe')
      var doc = frameDoc(role)
      var nodes = drawnNodes(doc).length
      var errors = []
      var offline = []
      var examples = 0
      if (doc && doc.documentElement) {
        errors = frame.contentWindow.__viewerErrors || []
        offline = frame.contentWindow.__viewerOffline || []
        examples = doc.querySelectorAll('.feature-detail .ctx-container').length
        widest = Math.max(widest, doc.documentElement.scrollWidth - doc.documentElement.clientWidth)
      }
      var discs = paint(role)
      var adapterNodes = markAdapter(role)
      status.dataset.nodes = String(nodes)
      status.dataset.adapter = String(adapterNodes)
      status.dataset.errors = errors.join('\n')
      status.dataset.diff = String(discs)
      status.dataset.clicked = clickedIn(role) || ''
      status.dataset.examples = String(examples)
      status.dataset.labelGap = String(smallestLabelGap(doc))
      var graphBox = doc && doc.querySelector('.link-graph')
      status.dataset.paneWidth = String(Math.round(section.getBoundingClientRect().width))
      status.dataset.graphWidth = String(graphBox ? Math.round(graphBox.getBoundingClientRect().width) : 0)
      status.classList.toggle('has-errors', errors.length > 0)
      status.title = errors.concat(offline).join('\n')
      var parts = frame.hidden ? [] : [nodes + ' nodes']
      if (discs) parts.push(discs + ' changed')
      if (adapterNodes) parts.push(adapterNodes + ' adapter')
      if (errors.length) parts.push(errors.length + ' page error(s)')
      if (offline.length) parts.push('hosted feature examples unreachable')
      status.textContent = parts.join(', ')
    })
    state.dataset.overflowX = String(Math.max(0, widest))
    state.dataset.selected = featureKey(selected)
    state.dataset.prompt = select.value
    state.dataset.note = featureNote.hidden ? '' : featureNote.textContent
  }

  // Smallest horizontal distance in px between the anchors of two shown token labels under a
  // pane's graph (12 px labels at 45 degrees overlap below about 17 px); -1 with fewer than two.
  function smallestLabelGap(doc) {
    if (!doc) return -1
    var xs = Array.prototype.slice.call(doc.querySelectorAll('g.prompt-token text'))
      .filter(function (t) { return t.style.display !== 'none' && t.getScreenCTM() })
      .map(function (t) { return t.getScreenCTM().e })  // the label's anchor on screen
      .sort(function (a, b) { return a - b })
    var gap = -1
    for (var i = 1; i < xs.length; i++) {
      if (gap < 0 || xs[i] - xs[i - 1] < gap) gap = xs[i] - xs[i - 1]
    }
    return Math.round(gap)
  }

  function truncate(text, n) {
    return text.length > n ? text.slice(0, n - 1) + '…' : text
  }
})()
