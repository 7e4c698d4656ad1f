// Where the ipywidgets HTML manager is in the site (_static/widgets/embed.js, fetched from npm by
// `make book`), it draws the saved widget views and this script does nothing. Without it (no npm at
// build time) a saved view cannot be drawn: say so where the widget would be, instead of a blank.
document.addEventListener("DOMContentLoaded", () => {
  if (document.querySelector('script[src*="widgets/embed.js"]')) return;
  const views = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]');
  for (const view of views) {
    const note = document.createElement("p");
    note.className = "offline-widget-note admonition note";
    note.textContent = "Interactive widget: it runs when you open this chapter in JupyterLab (make lab); " +
      "this copy of the book was built without the widget manager (npm), so it shows only static outputs.";
    view.parentNode.insertBefore(note, view);
  }
});
