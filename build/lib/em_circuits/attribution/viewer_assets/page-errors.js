// Loaded first on every viewer page. Records script errors, rejected promises and resources
// that failed to load, so the side-by-side page (and the browser test) can show them instead of
// leaving a silently blank graph. Failed requests to other hosts (the frontend fetches hosted
// feature examples when a feature is clicked) are kept apart: offline they are expected.
(function () {
  'use strict'
  var errors = window.__viewerErrors = []
  var offline = window.__viewerOffline = []

  function record(list, attribute, message) {
    list.push(String(message))
    document.documentElement.setAttribute(attribute, String(list.length))
  }

  var nativeFetch = window.fetch
  window.fetch = function (input) {
    var url = new URL(typeof input === 'string' ? input : input.url, location.href)
    var pending = nativeFetch.apply(this, arguments)
    if (url.origin === location.origin) return pending
    return pending.catch(function () {
      var err = new Error('not reachable (offline?): ' + url.href)
      err.viewerOffline = true
      throw err
    })
  }

  window.addEventListener('error', function (ev) {
    var target = ev.target
    if (target && target !== window && (target.src || target.href)) {
      record(errors, 'data-viewer-errors', 'failed to load ' + (target.src || target.href))
    } else {
      record(errors, 'data-viewer-errors', ev.message || ev.error)
    }
  }, true)  // capture: resource load errors do not bubble to window

  window.addEventListener('unhandledrejection', function (ev) {
    var reason = ev.reason
    if (reason && reason.viewerOffline) {
      record(offline, 'data-viewer-offline', reason.message)
      ev.preventDefault()  // expected without internet; keep the console readable
      return
    }
    record(errors, 'data-viewer-errors',
      'unhandled rejection: ' + (reason && reason.message ? reason.message : reason))
  })
})()
