// Loaded before circuit-tracer's scripts. Where the frontend writes text from the graph files
// (node names with prompt tokens, feature labels, target names) or from the URL as HTML, the
// viewer's copy calls emEscapeHtml on that text first (HTML_SINK_PATCHES in
// em_circuits/attribution/viewer_frontend.py): markup in a prompt shows as text, never runs.
(function () {
  'use strict'
  var ENTITIES = {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}
  window.emEscapeHtml = function (value) {
    return String(value === undefined || value === null ? '' : value)
      .replace(/[&<>"']/g, function (c) { return ENTITIES[c] })
  }
})()
